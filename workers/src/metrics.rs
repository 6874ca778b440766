//! The worker metrics of DESIGN.md.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct WorkerMetrics {
    /// By consumer and outcome: processed, duplicate, retried, dead_lettered.
    pub messages: IntCounterVec,
    pub duration: HistogramVec,
    pub notifications_undelivered: IntGauge,
    pub integrity_violations: IntGaugeVec,
}

impl WorkerMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            messages: IntCounterVec::new(
                Opts::new(
                    "entrip_worker_messages_total",
                    "Messages handled by the workers.",
                ),
                &["consumer", "outcome"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "entrip_worker_processing_duration_seconds",
                    "Time to handle one message, acknowledgement included.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["consumer"],
            )?,
            notifications_undelivered: IntGauge::new(
                "entrip_notifications_undelivered",
                "Webhook deliveries that failed for good (dead-lettered).",
            )?,
            integrity_violations: IntGaugeVec::new(
                Opts::new(
                    "entrip_integrity_violations",
                    "Rows found by the last integrity check, by check.",
                ),
                &["check"],
            )?,
        };
        registry.register(Box::new(m.messages.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.notifications_undelivered.clone()))?;
        registry.register(Box::new(m.integrity_violations.clone()))?;
        Ok(m)
    }
}
