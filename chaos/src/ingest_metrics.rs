//! Ingest's AMQP counters as the chaos run reads them: scrapes of
//! `/metrics` (`entrip_ingest_messages_total{type,outcome}` and
//! `entrip_ingest_reply_failures_total{reason}`), taken before every SIGKILL
//! of ingest and once after the drain, and summed over ingest's lives (a
//! killed process takes its counters with it). What happened between the
//! last scrape and the kill is not counted, so the sums are lower bounds of
//! what ingest did; the checks use them only where that is enough.

use std::{collections::BTreeMap, time::Duration};

/// One scrape (or a sum of them): counts by label value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestCounts {
    /// `entrip_ingest_messages_total` by outcome (`accepted`, `replayed`,
    /// `rejected`, `dead_lettered`, `retried`), over every command type.
    pub messages: BTreeMap<String, u64>,
    /// `entrip_ingest_reply_failures_total` by reason.
    pub reply_failures: BTreeMap<String, u64>,
}

impl IngestCounts {
    pub fn outcome(&self, outcome: &str) -> u64 {
        self.messages.get(outcome).copied().unwrap_or(0)
    }

    pub fn add(&mut self, other: &Self) {
        for (k, v) in &other.messages {
            *self.messages.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.reply_failures {
            *self.reply_failures.entry(k.clone()).or_default() += v;
        }
    }
}

/// The value of label `name` in a sample's `{…}` part.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// Reads the two counters from Prometheus text exposition.
pub fn parse(text: &str) -> IngestCounts {
    let mut counts = IngestCounts::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((metric, labels)) = series.split_once('{') else {
            continue;
        };
        let labels = labels.trim_end_matches('}');
        // Counters are whole numbers, printed as such.
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let value = value.max(0.0) as u64;
        let (map, key) = match metric {
            "entrip_ingest_messages_total" => (&mut counts.messages, label(labels, "outcome")),
            "entrip_ingest_reply_failures_total" => {
                (&mut counts.reply_failures, label(labels, "reason"))
            }
            _ => continue,
        };
        if let Some(key) = key {
            *map.entry(key.to_owned()).or_default() += value;
        }
    }
    counts
}

/// Scrapes ingest at `base` (its HTTP URL) within `timeout`.
pub async fn scrape(base: &str, timeout: Duration) -> Result<IngestCounts, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let resp = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(|e| format!("GET {base}/metrics: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {base}/metrics: {}", resp.status()));
    }
    let text = resp
        .text()
        .await
        .map_err(|e| format!("GET {base}/metrics: {e}"))?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_outcomes_over_types() {
        let text = "# HELP entrip_ingest_messages_total AMQP requests\n\
            # TYPE entrip_ingest_messages_total counter\n\
            entrip_ingest_messages_total{outcome=\"accepted\",type=\"booking.create\"} 5\n\
            entrip_ingest_messages_total{outcome=\"accepted\",type=\"payment.create\"} 2\n\
            entrip_ingest_messages_total{outcome=\"dead_lettered\",type=\"unknown\"} 1\n\
            entrip_ingest_reply_failures_total{reason=\"unroutable\"} 3\n\
            entrip_ingest_requests_total{route=\"/v1/bookings\"} 9\n";
        let c = parse(text);
        assert_eq!(c.outcome("accepted"), 7);
        assert_eq!(c.outcome("dead_lettered"), 1);
        assert_eq!(c.outcome("replayed"), 0);
        assert_eq!(c.reply_failures.get("unroutable"), Some(&3));
        let mut sum = c.clone();
        sum.add(&c);
        assert_eq!(sum.outcome("accepted"), 14);
    }
}
