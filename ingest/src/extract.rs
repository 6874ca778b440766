//! The HTTP side of a request, as axum extractors: the `Idempotency-Key`
//! header ([`Key`]), who is calling ([`Caller`]: the API client the bearer
//! check of `auth.rs` let in, and the trace context), a path id ([`PathId`]);
//! [`Post`] bundles what every POST needs, its body as bytes. Each answers a bad request with the
//! problem+json of `error.rs`. What a body means is `requests.rs`'s.

use axum::{
    body::Body,
    extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request},
    http::{HeaderMap, header, request::Parts},
};
use entrip_common::{
    domain::IdempotencyKey,
    trace::{TRACEPARENT_HEADER, TraceParent},
};
use http_body_util::BodyExt;
use uuid::Uuid;

use crate::{
    App, auth::Refused, clients::Client, commands::Context, error::ApiError, requests::Refusal,
};

/// The `Idempotency-Key` header, required on every POST.
pub(crate) struct Key(pub(crate) IdempotencyKey);

impl<S: Send + Sync> FromRequestParts<S> for Key {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let invalid = |message: &str| ApiError::from(Refusal::field("Idempotency-Key", message));
        let value = parts
            .headers
            .get("idempotency-key")
            .ok_or_else(|| invalid("header is required on every POST"))?;
        let text = value
            .to_str()
            .map_err(|_| invalid("must be 16-255 visible ASCII characters"))?;
        IdempotencyKey::parse(text)
            .map(Self)
            .map_err(|e| invalid(&e.0))
    }
}

/// Who sends the request, for the idempotency scope, the audit log and the
/// events it causes: the API client and its W3C trace context.
pub(crate) struct Caller {
    pub(crate) client: Client,
    pub(crate) traceparent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Every /v1 route has the bearer check's layer; a route without it
        // fails closed.
        let client = parts
            .extensions
            .get::<Client>()
            .cloned()
            .ok_or(ApiError::Refused(Refused::Missing))?;
        Ok(Self {
            client,
            traceparent: traceparent(&parts.headers),
        })
    }
}

/// A valid W3C `traceparent` header, if one was sent (an invalid one is
/// ignored, as the W3C recommendation says).
fn traceparent(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(TRACEPARENT_HEADER)?.to_str().ok()?;
    TraceParent::parse(value).map(|tp| tp.to_string())
}

/// The entity id in the path (`/v1/bookings/{id}`): a UUID, else a 400
/// naming the parameter.
pub(crate) struct PathId(pub(crate) Uuid);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid = || ApiError::from(Refusal::field("id", "must be a UUID"));
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| invalid())?;
        Uuid::parse_str(&raw).map(Self).map_err(|_| invalid())
    }
}

/// Reads the body, refusing more than `limit` bytes with a 413 and a
/// non-JSON content type with a 415.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "{essence}; send application/json"
            )));
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(err) => Err(ApiError::BadRequest(format!(
            "cannot read the request body: {err}"
        ))),
    }
}

/// A POST: the key first (no body is read for a request without one), the
/// caller, then the body's bytes (at most `ingest.body_limit_bytes`, JSON).
/// What the body means is the command type's (`requests.rs`).
pub(crate) struct Post {
    pub(crate) key: IdempotencyKey,
    pub(crate) context: Context,
    /// The route template, e.g. `/v1/bookings/{id}/cancel` (metric label).
    pub(crate) route: String,
    pub(crate) bytes: Vec<u8>,
}

impl FromRequest<App> for Post {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &App) -> Result<Self, ApiError> {
        let (mut parts, body) = req.into_parts();
        let Key(key) = Key::from_request_parts(&mut parts, app).await?;
        let caller = Caller::from_request_parts(&mut parts, app).await?;
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        let bytes = read_body(&parts.headers, body, app.settings.body_limit_bytes).await?;
        let context = Context {
            channel: "http",
            client: caller.client.name,
            idempotency_key: key.as_str().to_owned(),
            traceparent: caller.traceparent,
        };
        Ok(Self {
            key,
            context,
            route,
            bytes,
        })
    }
}
