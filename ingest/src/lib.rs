//! Entrip ingest: the HTTP API and the AMQP request consumer (`amqp.rs`)
//! that validate requests from upstream systems and store each accepted
//! change with its audit row, its outbox event and its idempotency record
//! in one PostgreSQL transaction.

pub mod amqp;
mod auth;
pub mod clients;
mod commands;
mod error;
mod extract;
pub mod idempotency;
mod limit;
mod metrics;
pub mod openapi;
mod requests;
mod routes;
mod submit;

use std::{
    ops::Deref,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use entrip_common::config::IngestSettings;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use prometheus::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    catch_panic::CatchPanicLayer, sensitive_headers::SetSensitiveRequestHeadersLayer,
    trace::TraceLayer,
};
use utoipa_axum::{router::OpenApiRouter, router::UtoipaMethodRouter, routes};

use crate::{
    auth::{Authenticator, Guard},
    clients::Scope,
    error::{ApiError, ShedAnswer},
    limit::InFlight,
    metrics::IngestMetrics,
};

/// Shared state of the handlers. One `Arc`: every layer and handler takes
/// a clone per request, and a clone of the parts (a dozen `Arc`s of pool,
/// metrics and cache) showed up in the profile of an overloaded ingest.
#[derive(Clone)]
pub struct App(Arc<Shared>);

/// What [`App`] shares.
pub struct Shared {
    pool: PgPool,
    settings: Arc<IngestSettings>,
    metrics: IngestMetrics,
    registry: Registry,
    auth: Authenticator,
    /// One permit per API request being processed (`ingest.max_in_flight`).
    in_flight: InFlight,
    /// What a request beyond the in-flight limit gets.
    shed_answer: ShedAnswer,
    /// The OpenAPI document (`GET /openapi.json`), built with the router.
    openapi: OnceLock<Bytes>,
}

impl App {
    pub fn new(
        pool: PgPool,
        settings: IngestSettings,
        registry: Registry,
    ) -> Result<Self, prometheus::Error> {
        let metrics = IngestMetrics::register(&registry)?;
        if !settings.auth_enabled {
            tracing::warn!(
                "ingest.auth_enabled is false: every /v1 request acts as client `(anonymous)` with every scope; only for measuring"
            );
        }
        let auth = Authenticator::new(
            pool.clone(),
            Duration::from_secs(settings.auth_cache_secs),
            settings.auth_enabled,
            metrics.auth_failures.clone(),
        );
        Ok(Self(Arc::new(Shared {
            shed_answer: ShedAnswer::new(settings.retry_after_secs),
            in_flight: InFlight::new(
                settings.adaptive_in_flight,
                settings.min_in_flight,
                settings.max_in_flight,
                metrics.in_flight_limit.clone(),
            ),
            pool,
            settings: Arc::new(settings),
            metrics,
            registry,
            auth,
            openapi: OnceLock::new(),
        })))
    }

    /// How long a stored idempotency key answers replays.
    fn idempotency_ttl(&self) -> Duration {
        Duration::from_secs(self.settings.idempotency_ttl_secs)
    }
}

impl Deref for App {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The full router: the API (authenticated, limited in flight and in time),
/// then health, readiness, metrics and the OpenAPI document, which are
/// never shed. Each handler is registered through its `#[utoipa::path]`
/// (`routes!`), so the document lists exactly the routes served; the
/// document is built here, once.
fn router(app: App) -> Router {
    let guarded = |scope: Scope, (schemas, mut paths, route): UtoipaMethodRouter<App>| {
        openapi::require_scope(&mut paths, scope);
        let route = route.route_layer(middleware::from_fn_with_state(
            Guard::new(&app, scope),
            auth::authorize,
        ));
        (schemas, paths, route)
    };
    let (api, api_doc) = OpenApiRouter::default()
        .routes(guarded(Scope::UsersWrite, routes!(routes::create_user)))
        .routes(guarded(Scope::Read, routes!(routes::get_user)))
        .routes(guarded(
            Scope::BookingsWrite,
            routes!(routes::create_booking),
        ))
        .routes(guarded(Scope::Read, routes!(routes::get_booking)))
        .routes(guarded(
            Scope::BookingsWrite,
            routes!(routes::cancel_booking),
        ))
        .routes(guarded(
            Scope::PaymentsWrite,
            routes!(routes::create_payment),
        ))
        .routes(guarded(Scope::Read, routes!(routes::get_payment)))
        .routes(guarded(
            Scope::PaymentsResult,
            routes!(routes::payment_result),
        ))
        .routes(guarded(
            Scope::ApprovalsWrite,
            routes!(routes::create_approval),
        ))
        .routes(guarded(Scope::Read, routes!(routes::get_approval)))
        .routes(guarded(
            Scope::ApprovalsDecide,
            routes!(routes::decide_approval),
        ))
        .split_for_parts();
    let api = api
        .method_not_allowed_fallback(routes::method_not_allowed)
        // The deadline covers the handler and the bearer check.
        .layer(middleware::from_fn_with_state(app.clone(), deadline))
        .with_state(app.clone());
    let (open, open_doc) = OpenApiRouter::default()
        .routes(routes!(routes::readyz))
        .routes(routes!(routes::openapi_json))
        .split_for_parts();
    let open = open
        .with_state(app.clone())
        .merge(entrip_common::metrics::router(app.registry.clone()))
        .fallback(routes::no_route);
    match openapi::document(api_doc, open_doc).and_then(|doc| serde_json::to_vec_pretty(&doc)) {
        Ok(mut doc) => {
            doc.push(b'\n');
            let _ = app.openapi.set(Bytes::from(doc));
        }
        Err(err) => tracing::error!(%err, "cannot build the OpenAPI document"),
    }
    // Shedding is the API's outermost layer (axum runs layers after the
    // routing): a shed request costs the routing and a prebuilt answer, not
    // the tracing, panic and metrics layers; under overload those answers
    // are most of the requests, and their CPU is taken from PostgreSQL.
    let api = edge(api, &app).layer(middleware::from_fn_with_state(app.clone(), shed));
    api.merge(edge(open, &app))
}

/// The layers of every answer: metrics, the URI limit, panics as 500s,
/// `Retry-After` on 503s, a trace span without the `Authorization` header.
fn edge(router: Router, app: &App) -> Router {
    router
        .layer(middleware::from_fn_with_state(
            app.metrics.clone(),
            metrics::track,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), limit_uri))
        .layer(CatchPanicLayer::custom(
            |panic: Box<dyn std::any::Any + Send>| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                ApiError::Panicked(message).into_response()
            },
        ))
        .layer(middleware::from_fn_with_state(app.clone(), retry_after))
        // 5xx answers are logged once, by `ApiError`; not again as failures.
        .layer(TraceLayer::new_for_http().on_failure(()))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
}

/// Answers 503 at once when the in-flight limit (at most
/// `ingest.max_in_flight`) is reached, with the answer built at start-up
/// (counted like any other in `entrip_ingest_requests_total`); the permit is
/// held until the answer is ready, and the time it took moves an adaptive
/// limit. Refusals (4xx) and replays do not count: they are answered
/// without the work of a request, and as the quickest answers they would
/// become the no-load baseline that the real work is measured against.
async fn shed(State(app): State<App>, req: Request, next: Next) -> Response {
    match app.in_flight.try_acquire() {
        Some(permit) => {
            let response = next.run(req).await;
            let status = response.status();
            if status.is_client_error() || response.headers().contains_key(routes::REPLAYED) {
                drop(permit);
            } else {
                permit.finish(status.is_server_error());
            }
            response
        }
        None => {
            let start = std::time::Instant::now();
            app.metrics.shed.inc();
            let response = app.shed_answer.response();
            app.metrics.record(&req, response.status(), start);
            response
        }
    }
}

/// Answers 503 (problem+json) when the request runs past
/// `ingest.request_timeout_secs`; the handler is dropped, so its
/// transaction rolls back and a retry with the same key is safe.
async fn deadline(State(app): State<App>, req: Request, next: Next) -> Response {
    let secs = app.settings.request_timeout_secs;
    match tokio::time::timeout(Duration::from_secs(secs), next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut { secs }.into_response(),
    }
}

/// Answers 414 to a request URI over `ingest.max_uri_bytes`.
async fn limit_uri(State(app): State<App>, req: Request, next: Next) -> Response {
    let limit = app.settings.max_uri_bytes;
    let len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > limit {
        return ApiError::UriTooLong { limit }.into_response();
    }
    next.run(req).await
}

/// Every 503 tells the client when to come back (`ingest.retry_after_secs`).
async fn retry_after(State(app): State<App>, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(app.settings.retry_after_secs),
        );
    }
    response
}

/// Serves until `shutdown` is cancelled, then finishes requests in flight.
/// A client that does not send a whole request head within
/// `ingest.header_read_timeout_secs`, or sends one over
/// `ingest.max_header_bytes` (431), loses its connection.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(app.settings.header_read_timeout_secs))
        .max_buf_size(app.settings.max_header_bytes);
    let service = TowerToHyperService::new(router(app));
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: pause, not spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Purges expired idempotency keys every `interval` until `shutdown`.
pub async fn purge_loop(pool: PgPool, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match idempotency::purge_expired(&pool, 1000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "expired idempotency keys purged"),
            Err(err) => tracing::warn!(%err, "idempotency key purge failed; will retry"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The OpenAPI document the router builds (no database needed).
    pub(crate) async fn document() -> serde_json::Value {
        let pool = PgPool::connect_lazy("postgres://127.0.0.1:1/none").unwrap();
        let app = App::new(
            pool,
            IngestSettings::default(),
            entrip_common::metrics::new_registry(),
        )
        .unwrap();
        let _ = router(app.clone());
        serde_json::from_slice(app.openapi.get().expect("the document is built")).unwrap()
    }

    /// Each command of `requests.rs` (also the AMQP commands) is a
    /// documented POST with the command's scope and body.
    #[tokio::test]
    async fn every_command_is_documented_with_its_route_scope_and_body() {
        let doc = document().await;
        for kind in requests::CommandType::EVERY {
            let op = &doc["paths"][kind.route()]["post"];
            assert!(op.is_object(), "{} is not documented", kind.route());
            assert_eq!(
                op["security"][0]["bearer"][0],
                kind.scope().as_str(),
                "{}",
                kind.route()
            );
            assert_eq!(
                op["requestBody"]["content"]["application/json"]["schema"]["$ref"],
                format!("#/components/schemas/{}", kind.body_schema()),
            );
        }
    }
}
