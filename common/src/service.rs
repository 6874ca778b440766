//! The start of every service binary: the shutdown token, the migrated
//! pool, the Prometheus registry, and the listen address bound with an
//! error that names its configuration key.

use std::net::SocketAddr;

use prometheus::Registry;
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{config::DatabaseSettings, db, metrics, shutdown};

/// The exit status of a service that cannot bind its listen address (the
/// port is taken): a supervisor can tell it from any other failure and
/// start the service on another port. (2 is a bad configuration.)
pub const EXIT_CANNOT_LISTEN: i32 = 3;

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

impl StartError {
    /// Stops the process with one line naming the problem on stderr and
    /// [`EXIT_CANNOT_LISTEN`] for a taken listen address, 1 otherwise.
    pub fn exit(self, binary: &str) -> ! {
        eprintln!("{binary}: {self}");
        std::process::exit(match self {
            Self::Listen { .. } => EXIT_CANNOT_LISTEN,
            Self::Database(_) => 1,
        })
    }
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
    /// `/metrics` and `/healthz` on the service's listen address, until
    /// shutdown.
    pub http: JoinHandle<std::io::Result<()>>,
}

impl Service {
    /// Listens for shutdown signals, connects and migrates the database,
    /// and serves the metrics on `listen` (the value of setting `key`).
    pub async fn start(
        database: &DatabaseSettings,
        listen: SocketAddr,
        key: &'static str,
    ) -> Result<Self, StartError> {
        let shutdown = shutdown::on_signal();
        let pool = db::connect_and_migrate(database).await?;
        let listener = bind(listen, key).await?;
        let registry = metrics::new_registry();
        let http = metrics::spawn_server(listener, registry.clone(), shutdown.clone());
        Ok(Self {
            shutdown,
            pool,
            registry,
            http,
        })
    }
}
