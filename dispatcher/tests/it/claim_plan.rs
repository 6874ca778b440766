//! The claim's plan when the statistics are wrong: many rows start waiting
//! for a retry before the statistics know it (a broker outage fails whole
//! batches), a backlog arrives in a table analyzed while empty (workers
//! settling a backlog with no dispatcher running), or in one never analyzed. Each probe must stay one
//! lookup in the aggregate's index per candidate. The chaos suite and a
//! benchmark once saw the claim run into the statement timeout here, and a
//! fresh database (never analyzed) made the dispatcher's process tests take
//! minutes.

use entrip_dispatcher::outbox::{self, CLAIM_SQL};
use sqlx::PgPool;

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn rows_waiting_for_a_retry_do_not_make_the_claim_quadratic(pool: PgPool) {
    sqlx::query("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    // 4,000 aggregates with 5 events each, all due; statistics taken now.
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload)
         SELECT gen_random_uuid(), 'booking', a.id, 'booking.created', '{}'
           FROM generate_series(0, 4) g(n),
                (SELECT gen_random_uuid() id, i FROM generate_series(1, 4000) i) a
          ORDER BY g.n, a.i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE outbox").execute(&pool).await.unwrap();
    // Then one row in eight starts waiting, unknown to the statistics.
    sqlx::query(
        "UPDATE outbox SET attempts = 1, next_attempt_at = now() + interval '1 hour'
          WHERE seq % 8 = 0",
    )
    .execute(&pool)
    .await
    .unwrap();

    let explain = format!("EXPLAIN (FORMAT JSON) {}", CLAIM_SQL.replace("$1", "2000"));
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .fetch_one(&pool)
        .await
        .unwrap();
    let plan = plan.to_string();
    assert!(
        !plan.contains("Materialize"),
        "the retry test is planned over all waiting rows: {plan}"
    );
    assert!(
        !plan.contains("outbox_due_idx"),
        "the retry test scans the retry index per candidate: {plan}"
    );

    // And the claim still keeps rows behind a waiting row out.
    let mut tx = pool.begin().await.unwrap();
    let rows = outbox::claim(&mut tx, 2000).await.unwrap();
    assert_eq!(rows.len(), 2000);
    let behind: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox o
          WHERE o.id = ANY($1) AND EXISTS (
                SELECT 1 FROM outbox w
                 WHERE w.aggregate_id = o.aggregate_id AND w.seq < o.seq
                   AND w.next_attempt_at > now())",
    )
    .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        behind, 0,
        "a claimed row is behind a row waiting for its retry"
    );
    tx.rollback().await.unwrap();
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_backlog_in_a_table_analyzed_while_empty_keeps_the_probes_per_aggregate(pool: PgPool) {
    sqlx::query("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE outbox").execute(&pool).await.unwrap();
    // Two events per settled booking, as the settlement worker writes them.
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload)
         SELECT gen_random_uuid(), t.kind, gen_random_uuid(), t.topic, '{}'
           FROM generate_series(1, 10000) i,
                (VALUES ('settlement', 'settlement.recorded'), ('booking', 'booking.confirmed')) t(kind, topic)",
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_probes_use_the_aggregate_index(&pool).await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_backlog_in_a_table_never_analyzed_keeps_the_probes_per_aggregate(pool: PgPool) {
    // A fresh database: no statistics at all. A backlog of 100 aggregates
    // with 100 events each and CloudEvents-sized payloads (the layout of the
    // dispatcher's process tests), part of it already published.
    sqlx::query("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload)
         SELECT gen_random_uuid(), 'booking', a.id, 'booking.created',
                json_build_object('specversion', '1.0', 'type', 'booking.created',
                                  'subject', a.id, 'data', json_build_object('id', a.id, 'n', g.n))
           FROM generate_series(0, 99) g(n),
                (SELECT gen_random_uuid() id, i FROM generate_series(1, 100) i) a
          ORDER BY g.n, a.i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE outbox SET published_at = now() WHERE seq <= 6000")
        .execute(&pool)
        .await
        .unwrap();
    assert_probes_use_the_aggregate_index(&pool).await;
}

/// Both probes of the claim (older row waiting for a retry; older
/// undelivered rows) are lookups in `outbox_pending_aggregate_idx`, never a
/// scan of the seq or retry index, nor a loop over materialized rows.
async fn assert_probes_use_the_aggregate_index(pool: &PgPool) {
    let explain = format!("EXPLAIN (FORMAT JSON) {}", CLAIM_SQL.replace("$1", "2000"));
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .fetch_one(pool)
        .await
        .unwrap();
    let plan = plan.to_string();
    assert!(
        !plan.contains("Materialize"),
        "a probe is planned over materialized rows: {plan}"
    );
    assert!(
        !plan.contains("outbox_due_idx"),
        "a probe scans the retry index: {plan}"
    );
    assert_eq!(
        plan.matches("outbox_pending_aggregate_idx").count(),
        2,
        "both probes use the aggregate's index: {plan}"
    );
    assert_eq!(
        plan.matches("outbox_undelivered_seq_idx").count(),
        1,
        "only the candidate scan walks the seq index: {plan}"
    );
}
