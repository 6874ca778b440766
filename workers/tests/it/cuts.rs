//! The settlement consumer while PostgreSQL is cut off through a proxy:
//! messages that fail meanwhile go through the retry path, and once the
//! database is back every booking is settled exactly once.

use std::time::Duration;

use entrip_common::config::WorkersSettings;
use entrip_testkit::{Proxy, Vhost, eventually};
use entrip_workers::settlement::Settlement;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::support::*;

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_database_cut_delays_settlements_but_loses_and_doubles_none(
    _opts: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let direct = PgPool::connect_with(connect.clone()).await.unwrap();
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let via_proxy = PgPoolOptions::new()
        .max_connections(30)
        .acquire_timeout(Duration::from_millis(500))
        .connect_with(connect.host("127.0.0.1").port(proxy.addr.port()))
        .await
        .unwrap();
    let vhost = Vhost::new();
    let fixtures = approved_bookings(&direct, 40).await;
    let (_conn, ch) = channel(&vhost.url()).await;
    // Plenty of retries: the cut lasts longer than the short test delays.
    let settings = WorkersSettings {
        max_retries: 50,
        ..workers_settings()
    };
    let worker = start(Settlement::new(via_proxy.clone()), &vhost.url(), settings);
    let settled = || scalar(&direct, "SELECT count(*) FROM settlements");

    publish_approved(&ch, &fixtures[..20]).await;
    until_count("the first half settled", 20, settled).await;
    assert_eq!(settled().await, 20);

    proxy.cut();
    publish_approved(&ch, &fixtures[20..]).await;
    eventually("failures go through the retry path", || async {
        worker.count("settlement", "retried") > 0
    })
    .await;
    assert_eq!(settled().await, 20);

    proxy.restore();
    until_count("every booking settled after the cut", 40, settled).await;
    assert_eq!(settled().await, 40);
    assert_eq!(
        scalar(
            &direct,
            "SELECT count(*) FROM outbox WHERE topic = 'settlement.recorded'"
        )
        .await,
        40
    );
    assert_eq!(
        scalar(
            &direct,
            "SELECT count(*) FROM inbox WHERE consumer = 'settlement'"
        )
        .await,
        40
    );
    assert_eq!(worker.count("settlement", "dead_lettered"), 0);
    worker.stop().await;
}
