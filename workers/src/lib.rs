//! Entrip workers: the settlement and notification consumers (each effect
//! exactly once in effect), their shared runtime, and the integrity checker.
//!
//! The public surface is what the `workers` binary and the tests need:
//! building and running the consumers and the checker, the handlers'
//! message and outcome types, the metrics, and the integrity report.

mod event;
mod inbox;
pub mod integrity;
pub mod metrics;
pub mod notifications;
/// The consumer runtime, shared with ingest's AMQP requests.
pub mod runtime {
    pub use entrip_common::consumer::*;
}
pub mod settlement;
