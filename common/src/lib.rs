//! Shared library of the Entrip fleet: configuration, telemetry, the
//! PostgreSQL pool and migrations, domain types, the audit log and outbox
//! writers, the Prometheus registry and exporter, graceful shutdown, and
//! the start-up every service shares.

pub mod amqp;
pub mod audit;
pub mod config;
pub mod consumer;
pub mod db;
pub mod domain;
pub mod events;
pub mod metrics;
pub mod service;
pub mod shutdown;
pub mod signing;
pub mod store;
pub mod telemetry;
pub mod trace;
pub mod views;
