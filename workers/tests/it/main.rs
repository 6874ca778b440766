//! The workers' integration tests, one binary: each module against the real
//! PostgreSQL (a database per test) and RabbitMQ (a vhost per test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod acks;
mod cuts;
mod e2e;
mod forward;
mod integrity;
mod notifications;
mod runbook;
mod settlement;
mod smoke;
