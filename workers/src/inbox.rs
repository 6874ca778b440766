//! Table `inbox`: (consumer, message id) of every message whose effect is
//! committed, written in the effect's transaction.

use sqlx::PgConnection;

/// Records the message for this consumer: `true` when this is its first
/// record, `false` when it was already recorded (a redelivery: no second
/// effect).
pub(crate) async fn claim(
    conn: &mut PgConnection,
    consumer: &str,
    message_id: &str,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(message_id)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}
