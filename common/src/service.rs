//! The start of every service binary: the shutdown token, the migrated
//! pool, the Prometheus registry, and the listen address bound with an
//! error that names its configuration key.

use std::net::SocketAddr;

use prometheus::Registry;
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{config::DatabaseSettings, db, metrics, shutdown};

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database start-up: {0}")]
    Database(#[from] db::DbError),
    #[error("cannot listen on {addr} (key `{key}`): {reason}")]
    Listen {
        addr: SocketAddr,
        key: &'static str,
        reason: std::io::Error,
    },
}

/// Binds `addr`, the value of the setting `key` (e.g. `ingest.listen`).
pub async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|reason| StartError::Listen { addr, key, reason })
}

/// A running service's shared parts.
pub struct Service {
    /// Cancelled on SIGTERM or Ctrl-C.
    pub shutdown: CancellationToken,
    pub pool: PgPool,
    pub registry: Registry,
}

impl Service {
    /// Listens for shutdown signals, connects and migrates the database.
    pub async fn start(database: &DatabaseSettings) -> Result<Self, StartError> {
        let shutdown = shutdown::on_signal();
        let pool = db::connect_and_migrate(database).await?;
        Ok(Self {
            shutdown,
            pool,
            registry: metrics::new_registry(),
        })
    }

    /// Serves `/metrics` and `/healthz` on `addr` (setting `key`) until
    /// shutdown.
    pub async fn serve_metrics(
        &self,
        addr: SocketAddr,
        key: &'static str,
    ) -> Result<JoinHandle<std::io::Result<()>>, StartError> {
        let listener = bind(addr, key).await?;
        Ok(metrics::spawn_server(
            listener,
            self.registry.clone(),
            self.shutdown.clone(),
        ))
    }
}
