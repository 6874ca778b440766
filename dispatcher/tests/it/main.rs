//! The dispatcher's integration tests, one binary: the relay in-process
//! against the real PostgreSQL and RabbitMQ (`relay`), the claim's query
//! plans (`claim_plan`), and the `dispatcher` binary as a process
//! (`process`). Each test has its own database (`#[sqlx::test]`) and vhost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod claim_plan;
mod cluster;
mod process;
mod relay;
mod support;
