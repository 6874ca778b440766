//! The chaos suite's integration tests, one binary (like the other crates'
//! `tests/it`): the short CI run of the whole fleet under faults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod short;
