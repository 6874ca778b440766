//! The claim's plan when many rows start waiting for a retry before the
//! statistics know it (a broker outage fails whole batches): the retry test
//! must stay one index probe per candidate. The chaos suite once saw the
//! claim run into the statement timeout here, planned as a nested loop over
//! every waiting row for each candidate.

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
