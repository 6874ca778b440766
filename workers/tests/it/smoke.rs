//! A first settlement through the real broker: an approved payment's event
//! settles its booking and enqueues the two events of the settlement.

use entrip_common::domain::PaymentStatus;
use entrip_testkit::{Vhost, eventually};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn an_approved_payment_settles_its_booking(pool: PgPool) {
    let vhost = Vhost::new();
    let mut f = booking(&pool, false).await;
    add_payment(&pool, &mut f, PaymentStatus::Approved).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    let worker = start_settlement(&pool, &vhost.url());
    publish_event(
        &ch,
        Uuid::now_v7(),
        "payment.approved",
        payment_data(&f, "APPROVED"),
    )
    .await;
    eventually("settled", || async {
        scalar(&pool, "SELECT count(*) FROM settlements").await == 1
    })
    .await;
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM bookings WHERE status = 'CONFIRMED'"
        )
        .await,
        1
    );
    assert_eq!(scalar(&pool, "SELECT count(*) FROM outbox WHERE topic IN ('settlement.recorded', 'booking.confirmed')").await, 2);
    worker.stop().await;
}
