//! The outbox metrics of docs/DESIGN.md, plus publish latency.

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::outbox::Stats;

#[derive(Clone)]
pub struct RelayMetrics {
    undelivered: IntGauge,
    oldest_age: Gauge,
    pub published: IntCounterVec,
    pub failures: IntCounter,
    dead: IntGauge,
    /// Commit (outbox row created) to broker confirm.
    pub(crate) latency: Histogram,
}

impl RelayMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            undelivered: IntGauge::new(
                "entrip_outbox_undelivered",
                "Outbox rows neither published nor dead.",
            )?,
            oldest_age: Gauge::new(
                "entrip_outbox_oldest_undelivered_age_seconds",
                "Age of the oldest undelivered outbox row.",
            )?,
            published: IntCounterVec::new(
                Opts::new(
                    "entrip_outbox_published_total",
                    "Outbox rows published and confirmed by the broker.",
                ),
                &["topic"],
            )?,
            failures: IntCounter::new(
                "entrip_outbox_publish_failures_total",
                "Publishes refused by the broker (nack, return) or not confirmed in time.",
            )?,
            dead: IntGauge::new(
                "entrip_outbox_dead",
                "Outbox rows that reached the attempt limit.",
            )?,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "entrip_outbox_publish_latency_seconds",
                    "Time from the outbox row's commit to the broker's confirm.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
            )?,
        };
        registry.register(Box::new(m.undelivered.clone()))?;
        registry.register(Box::new(m.oldest_age.clone()))?;
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.dead.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        Ok(m)
    }

    pub(crate) fn set_stats(&self, stats: &Stats) {
        self.undelivered.set(stats.undelivered);
        self.oldest_age.set(stats.oldest_undelivered_age_secs);
        self.dead.set(stats.dead);
    }
}
