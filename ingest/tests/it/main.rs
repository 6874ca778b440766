//! Ingest's integration tests, one binary: the HTTP API over a real server,
//! the AMQP requests on a vhost of each test's own, and each test's own database (`#[sqlx::test]`) — validation, state
//! rules, idempotency, atomicity, authentication, overload — the schema's own constraints, and the
//! `ingest` binary as a process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod amqp;
mod atomicity;
mod auth;
mod binary;
mod idempotency;
mod overload;
mod schema;
mod state_rules;
mod support;
mod upstream;
mod validation;
