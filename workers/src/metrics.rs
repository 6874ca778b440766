//! The worker metrics of docs/DESIGN.md.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct WorkerMetrics {
    /// By consumer and outcome: processed, duplicate, retried, dead_lettered.
    pub(crate) messages: IntCounterVec,
    pub(crate) processing_duration: HistogramVec,
    pub(crate) notifications_undelivered: IntGauge,
    /// By check: the rows the last integrity run found.
    pub(crate) violations: IntGaugeVec,
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
            processing_duration: HistogramVec::new(
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
            violations: IntGaugeVec::new(
                Opts::new(
                    "entrip_integrity_violations",
                    "Rows found by the last integrity check, by check.",
                ),
                &["check"],
            )?,
        };
        registry.register(Box::new(m.messages.clone()))?;
        registry.register(Box::new(m.processing_duration.clone()))?;
        registry.register(Box::new(m.notifications_undelivered.clone()))?;
        registry.register(Box::new(m.violations.clone()))?;
        Ok(m)
    }

    /// The consumers' share of these metrics.
    pub fn consumer(&self) -> entrip_common::consumer::ConsumerMetrics {
        entrip_common::consumer::ConsumerMetrics {
            messages: self.messages.clone(),
            duration: self.processing_duration.clone(),
        }
    }

    /// `entrip_worker_messages_total{consumer, outcome}` now.
    pub fn messages_total(&self, consumer: &str, outcome: &str) -> u64 {
        self.messages.with_label_values(&[consumer, outcome]).get()
    }

    /// `entrip_integrity_violations{check}` now.
    pub fn integrity_violations(&self, check: &str) -> i64 {
        self.violations.with_label_values(&[check]).get()
    }
}
