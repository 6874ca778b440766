//! The one place where failures become HTTP answers: RFC 9457 problem+json
//! bodies with `type`, `title`, `status`, `detail` and, for validation,
//! `errors: [{field, message}]`.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use entrip_common::db;
use uuid::Uuid;

use crate::requests::{FieldError, Refusal};

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("invalid request: {0:?}")]
    Validation(Vec<FieldError>),
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("unsupported content type: {0}")]
    UnsupportedMediaType(String),
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    /// A rule across fields or entities (e.g. a payment's amount differs
    /// from its booking's).
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    IdempotencyMisuse(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// `Retry-After` seconds for 503s; set once at start-up.
static RETRY_AFTER: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Sets the `Retry-After` value sent with 503 answers.
pub(crate) fn set_retry_after(secs: u64) {
    let _ = RETRY_AFTER.set(secs);
}

impl ApiError {
    /// A rule across fields or entities was broken (422), at `field`.
    pub(crate) fn rule(field: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Self::Unprocessable {
            errors: vec![FieldError::new(field, detail.clone())],
            detail,
        }
    }

    pub(crate) fn not_found(entity: &'static str, id: Uuid) -> Self {
        Self::NotFound {
            entity,
            id: id.to_string(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadJson(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound { .. } | Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unprocessable { .. } | Self::IdempotencyMisuse(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::Validation(_) => ("validation", "Invalid request"),
            Self::BadJson(_) => ("invalid-json", "Malformed JSON body"),
            Self::BadRequest(_) => ("bad-request", "Bad request"),
            Self::PayloadTooLarge { .. } => ("payload-too-large", "Request body too large"),
            Self::UnsupportedMediaType(_) => ("unsupported-media-type", "Unsupported media type"),
            Self::NotFound { .. } => ("not-found", "Resource not found"),
            Self::NoRoute(_) => ("no-route", "No such endpoint"),
            Self::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            Self::Conflict(_) => ("conflict", "State conflict"),
            Self::Unprocessable { .. } => ("unprocessable", "Request breaks a business rule"),
            Self::IdempotencyMisuse(_) => ("idempotency-key-reused", "Idempotency-Key misuse"),
            Self::Unavailable(_) => ("unavailable", "Service temporarily unavailable"),
            Self::Internal(_) => ("internal", "Internal error"),
        }
    }

    /// The problem+json body.
    fn body(&self) -> serde_json::Value {
        let (slug, title) = self.kind();
        let status = self.status().as_u16();
        let detail = match self {
            Self::Validation(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            // Internals and database details stay in the logs.
            Self::Internal(_) => "an unexpected error occurred; it has been logged".to_owned(),
            Self::Unavailable(_) => "the database is unavailable; retry later".to_owned(),
            other => other.to_string(),
        };
        let mut body = serde_json::json!({
            "type": format!("https://entrip.dev/problems/{slug}"),
            "title": title,
            "status": status,
            "detail": detail,
        });
        if let Self::Validation(errors) | Self::Unprocessable { errors, .. } = self
            && !errors.is_empty()
        {
            body["errors"] = serde_json::json!(errors);
        }
        body
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Malformed(detail) => Self::BadJson(detail),
            Refusal::Fields(errors) => Self::Validation(errors),
            Refusal::Rule { field, detail } => Self::rule(field, detail),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if db::is_unavailable(&err) {
            return Self::Unavailable(err.to_string());
        }
        if let sqlx::Error::Database(dbe) = &err {
            let code = dbe.code().map(|c| c.into_owned()).unwrap_or_default();
            // Safety net: a value the validation let through but the schema
            // refuses is still the client's fault, never a 500.
            if code == "23514" || code.starts_with("22") {
                return Self::BadRequest(format!(
                    "a value was refused by the database{}",
                    dbe.constraint()
                        .map(|c| format!(" (constraint {c})"))
                        .unwrap_or_default()
                ));
            }
            if code == "23505" {
                return Self::Conflict(format!(
                    "the request conflicts with stored data{}",
                    dbe.constraint()
                        .map(|c| format!(" (constraint {c})"))
                        .unwrap_or_default()
                ));
            }
        }
        Self::Internal(err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(msg) => tracing::error!(error = %msg, "request failed"),
            Self::Unavailable(msg) => tracing::warn!(error = %msg, "database unavailable"),
            _ => tracing::debug!(error = %self, "request refused"),
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, Self::Unavailable(_)) {
            let secs = RETRY_AFTER.get().copied().unwrap_or(5);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
