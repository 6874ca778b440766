//! Ingest's integration tests, one binary: the HTTP API over a real server,
//! the AMQP requests on a vhost of each test's own, and each test's own database (`#[sqlx::test]`) — validation, state
//! rules, idempotency, atomicity, authentication, overload — the schema's own constraints, the
//! contracts in docs/ (OpenAPI, request JSON Schemas) against the server, and the
//! `ingest` binary as a process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod amqp;
mod atomicity;
mod auth;
mod binary;
mod idempotency;
mod openapi;
mod overload;
mod request_schemas;
mod schema;
mod state_rules;
mod support;
mod upstream;
mod validation;
