//! The ingest metrics of docs/DESIGN.md and the middleware that records them.

use std::{ops::Deref, sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::StatusCode,
    middleware::Next,
    response::Response,
};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// One `Arc`, cloned by each request's metrics layer.
#[derive(Clone)]
pub(crate) struct IngestMetrics(Arc<Metrics>);

pub(crate) struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    pub(crate) replays: IntCounterVec,
    pub(crate) shed: IntCounter,
    pub(crate) in_flight_limit: IntGauge,
    pub(crate) auth_failures: IntCounterVec,
    /// AMQP requests by type and outcome.
    messages: IntCounterVec,
    message_duration: HistogramVec,
    /// AMQP replies that did not reach their queue, by reason.
    pub(crate) reply_failures: IntCounterVec,
}

impl IngestMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "entrip_ingest_requests_total",
                "HTTP requests answered by ingest.",
            ),
            &["route", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "entrip_ingest_request_duration_seconds",
                "Time from request to response in ingest.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["route"],
        )?;
        let replays = IntCounterVec::new(
            Opts::new(
                "entrip_idempotency_replays_total",
                "Requests answered from a stored idempotent response.",
            ),
            &["route"],
        )?;
        let shed = IntCounter::new(
            "entrip_ingest_shed_total",
            "API requests answered 503 at once because the in-flight limit was reached.",
        )?;
        let in_flight_limit = IntGauge::new(
            "entrip_ingest_in_flight_limit",
            "API requests ingest admits at once now (adaptive up to ingest.max_in_flight).",
        )?;
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "entrip_ingest_auth_failures_total",
                "API requests (HTTP: the bearer check; AMQP: the broker user) refused, by reason.",
            ),
            &["reason"],
        )?;
        for reason in ["missing", "unknown", "revoked", "scope"] {
            auth_failures.with_label_values(&[reason]);
        }
        let messages = IntCounterVec::new(
            Opts::new(
                "entrip_ingest_messages_total",
                "AMQP requests handled by ingest, by command type and outcome.",
            ),
            &["type", "outcome"],
        )?;
        let message_duration = HistogramVec::new(
            HistogramOpts::new(
                "entrip_ingest_message_duration_seconds",
                "Time to handle one AMQP request, reply and acknowledgement included.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["type"],
        )?;
        let reply_failures = IntCounterVec::new(
            Opts::new(
                "entrip_ingest_reply_failures_total",
                "AMQP replies that did not reach their queue (unroutable, broker), the request stored all the same.",
            ),
            &["reason"],
        )?;
        for reason in ["unroutable", "broker"] {
            reply_failures.with_label_values(&[reason]);
        }
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(message_duration.clone()))?;
        registry.register(Box::new(reply_failures.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(in_flight_limit.clone()))?;
        registry.register(Box::new(auth_failures.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(replays.clone()))?;
        Ok(Self(Arc::new(Metrics {
            requests,
            duration,
            replays,
            shed,
            in_flight_limit,
            auth_failures,
            messages,
            message_duration,
            reply_failures,
        })))
    }

    /// The AMQP consumer's share.
    pub(crate) fn consumer(&self) -> entrip_common::consumer::ConsumerMetrics {
        entrip_common::consumer::ConsumerMetrics {
            messages: self.messages.clone(),
            duration: self.message_duration.clone(),
        }
    }
}

impl Deref for IngestMetrics {
    type Target = Metrics;

    fn deref(&self) -> &Metrics {
        &self.0
    }
}

/// The route template of a request (`/v1/bookings/{id}`), if it matched one.
fn route_of(req: &Request) -> Option<MatchedPath> {
    req.extensions().get::<MatchedPath>().cloned()
}

impl Metrics {
    /// Counts one answer by route and status, and times it from `start`.
    pub(crate) fn record(&self, req: &Request, status: StatusCode, start: Instant) {
        self.record_route(req.extensions().get::<MatchedPath>(), status, start);
    }

    fn record_route(&self, route: Option<&MatchedPath>, status: StatusCode, start: Instant) {
        let route = route.map_or("unmatched", MatchedPath::as_str);
        self.duration
            .with_label_values(&[route])
            .observe(start.elapsed().as_secs_f64());
        self.requests
            .with_label_values(&[route, status.as_str()])
            .inc();
    }
}

/// Counts every answer by route and status and times it.
pub(crate) async fn track(
    State(metrics): State<IngestMetrics>,
    req: Request,
    next: Next,
) -> Response {
    let route = route_of(&req);
    let start = Instant::now();
    let response = next.run(req).await;
    metrics.record_route(route.as_ref(), response.status(), start);
    response
}
