//! The testkit's own integration tests, one binary: the PostgreSQL role
//! helpers against the real server (a database per test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg;
