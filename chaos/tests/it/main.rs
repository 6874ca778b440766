//! The chaos suite's integration tests, one binary (like the other crates'
//! `tests/it`): the short CI run of the whole fleet under faults, and the
//! short restore rehearsal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod rehearsal;
mod short;
