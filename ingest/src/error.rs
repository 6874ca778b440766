//! The one place where failures become HTTP answers: RFC 9457 problem+json
//! bodies with `type`, `title`, `status`, `detail` and, for validation,
//! `errors: [{field, message}]`. Each 5xx is logged here, once, with its
//! source chain; `Retry-After` is added to every 503 by the router's
//! layer (`lib.rs`), from the settings, except to the shed answer, which is
//! built once with it ([`ShedAnswer`]).

use axum::{
    body::{Body, Bytes},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use uuid::Uuid;

use crate::{
    auth::Refused,
    commands::CommandError,
    requests::{FieldError, Refusal},
};

// The body `ApiError::body` renders, described for the OpenAPI document
// (component `Problem`): only its schema is used, and a test checks every
// kind of answer against it.
/// An RFC 9457 problem: the body of every error answer (`application/problem+json`).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct Problem {
    /// `https://entrip.dev/problems/<kind>`: `validation`, `invalid-json`,
    /// `bad-request`, `payload-too-large`, `unsupported-media-type`,
    /// `no-route`, `method-not-allowed`, `unauthorized`, `forbidden`,
    /// `uri-too-long`, `not-found`, `conflict`, `unprocessable`,
    /// `idempotency-key-reused`, `overloaded`, `timeout`, `unavailable`,
    /// `internal`.
    #[serde(rename = "type")]
    #[schema(format = "uri", pattern = r"^https://entrip\.dev/problems/[a-z\-]+$")]
    kind: String,
    /// A short summary of the kind of problem.
    title: String,
    /// The HTTP status of the answer.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// What went wrong with this request.
    detail: String,
    /// Each field at fault (`Idempotency-Key` and `id` for the header and
    /// the path id): present for a refused body (400) and a rule across
    /// fields (422), when there are any.
    #[schema(min_items = 1, nullable = false)]
    errors: Option<Vec<FieldError>>,
}

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
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request refused: {}", .0.reason())]
    Refused(Refused),
    /// An AMQP request whose broker user is no API client's (401).
    #[error("{0}")]
    Unidentified(String),
    /// An AMQP request whose client lacks the command's scope (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("request URI longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("too many requests in flight")]
    Overloaded,
    #[error("request ran past {secs} s")]
    TimedOut { secs: u64 },
    #[error("handler panicked: {0}")]
    Panicked(String),
    #[error("stored status {0} is not an HTTP status")]
    BadStatus(u16),
    /// What the command layer answered (404, 409, 422, 503, …).
    #[error(transparent)]
    Command(#[from] CommandError),
}

/// `err` and its sources, `: `-separated, for the log line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl ApiError {
    /// A rule across fields or entities was broken (422), at `field`.
    pub(crate) fn rule(field: &str, detail: impl Into<String>) -> Self {
        CommandError::rule(field, detail).into()
    }

    pub(crate) fn not_found(entity: &'static str, id: Uuid) -> Self {
        CommandError::not_found(entity, id).into()
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadJson(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Refused(Refused::Scope(_)) | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Refused(_) | Self::Unidentified(_) => StatusCode::UNAUTHORIZED,
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::Overloaded | Self::TimedOut { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Panicked(_) | Self::BadStatus(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Command(err) => match err {
                CommandError::NotFound { .. } => StatusCode::NOT_FOUND,
                CommandError::Conflict(_) => StatusCode::CONFLICT,
                CommandError::Unprocessable { .. } | CommandError::IdempotencyMisuse(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                CommandError::Refused(_) => StatusCode::BAD_REQUEST,
                CommandError::Unavailable(_) | CommandError::Contended => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                CommandError::Database(_) | CommandError::Render(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::Validation(_) => ("validation", "Invalid request"),
            Self::BadJson(_) => ("invalid-json", "Malformed JSON body"),
            Self::BadRequest(_) => ("bad-request", "Bad request"),
            Self::PayloadTooLarge { .. } => ("payload-too-large", "Request body too large"),
            Self::UnsupportedMediaType(_) => ("unsupported-media-type", "Unsupported media type"),
            Self::NoRoute(_) => ("no-route", "No such endpoint"),
            Self::MethodNotAllowed => ("method-not-allowed", "Method not allowed"),
            Self::Refused(Refused::Scope(_)) | Self::Forbidden(_) => ("forbidden", "Scope missing"),
            Self::Refused(_) | Self::Unidentified(_) => ("unauthorized", "Authentication required"),
            Self::UriTooLong { .. } => ("uri-too-long", "Request URI too long"),
            Self::Overloaded => ("overloaded", "Too many requests in flight"),
            Self::TimedOut { .. } => ("timeout", "Request timed out"),
            Self::Panicked(_) | Self::BadStatus(_) => ("internal", "Internal error"),
            Self::Command(err) => match err {
                CommandError::NotFound { .. } => ("not-found", "Resource not found"),
                CommandError::Conflict(_) => ("conflict", "State conflict"),
                CommandError::Unprocessable { .. } => {
                    ("unprocessable", "Request breaks a business rule")
                }
                CommandError::IdempotencyMisuse(_) => {
                    ("idempotency-key-reused", "Idempotency-Key misuse")
                }
                CommandError::Refused(_) => ("bad-request", "Bad request"),
                CommandError::Unavailable(_) | CommandError::Contended => {
                    ("unavailable", "Service temporarily unavailable")
                }
                CommandError::Database(_) | CommandError::Render(_) => {
                    ("internal", "Internal error")
                }
            },
        }
    }

    /// The problem+json body.
    pub(crate) fn body(&self) -> serde_json::Value {
        let (slug, title) = self.kind();
        let status = self.status().as_u16();
        let detail = match self {
            Self::Validation(errors) => errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
            // Internals and database details stay in the logs.
            Self::Panicked(_)
            | Self::BadStatus(_)
            | Self::Command(CommandError::Database(_) | CommandError::Render(_)) => {
                "an unexpected error occurred; it has been logged".to_owned()
            }
            Self::Command(CommandError::Unavailable(_)) => {
                "the database is unavailable; retry later".to_owned()
            }
            Self::Command(CommandError::Contended) => {
                "the request collided with another one; retry".to_owned()
            }
            Self::Overloaded => "too many requests are in flight; retry later".to_owned(),
            Self::TimedOut { secs } => {
                format!(
                    "the request was not answered within {secs} s; retry later (with the same Idempotency-Key)"
                )
            }
            Self::Refused(Refused::Missing) => {
                "send Authorization: Bearer <api key> (see the README, API keys)".to_owned()
            }
            Self::Refused(Refused::Unknown) => "the API key is not valid".to_owned(),
            Self::Refused(Refused::Revoked) => "the API key has been revoked".to_owned(),
            Self::Refused(Refused::Scope(scope)) => {
                format!("the API key lacks scope {scope}, which this route needs")
            }
            other => other.to_string(),
        };
        let mut body = serde_json::json!({
            "type": format!("https://entrip.dev/problems/{slug}"),
            "title": title,
            "status": status,
            "detail": detail,
        });
        if let Self::Validation(errors) | Self::Command(CommandError::Unprocessable { errors, .. }) =
            self
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

/// The reads (GETs) fail as the commands do.
impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        CommandError::from(err).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Shed requests never get here: their answer is `ShedAnswer`'s,
        // without a log line (they are counted in entrip_ingest_shed_total).
        if status.is_server_error() {
            let error = chain(&self);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(%error, "request not served");
            } else {
                tracing::error!(%error, "request failed");
            }
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match self {
            Self::Refused(Refused::Scope(scope)) => {
                let value = format!(
                    "Bearer realm=\"entrip\", error=\"insufficient_scope\", scope=\"{scope}\""
                );
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            Self::Refused(Refused::Missing) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"entrip\""),
                );
            }
            Self::Refused(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"entrip\", error=\"invalid_token\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// The 503 of a shed request, built at start-up: under overload it is most
/// of the answers, and each is taken from the CPU that the admitted
/// requests (and PostgreSQL) need.
pub(crate) struct ShedAnswer {
    body: Bytes,
    retry_after: HeaderValue,
}

impl ShedAnswer {
    pub(crate) fn new(retry_after_secs: u64) -> Self {
        Self {
            body: Bytes::from(ApiError::Overloaded.body().to_string()),
            retry_after: HeaderValue::from(retry_after_secs),
        }
    }

    pub(crate) fn response(&self) -> Response {
        let mut response = Response::new(Body::from(self.body.clone()));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::RETRY_AFTER, self.retry_after.clone());
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::Scope;

    /// Every kind of error answer, with and without field errors.
    fn every_kind() -> Vec<ApiError> {
        let field = || vec![FieldError::new("amount", "must be greater than 0")];
        let sql = || sqlx::Error::PoolTimedOut;
        let json = || serde_json::from_str::<u8>("x").unwrap_err();
        vec![
            ApiError::Validation(field()),
            ApiError::Validation(vec![]),
            ApiError::BadJson("EOF while parsing".into()),
            ApiError::BadRequest("cannot read the request body".into()),
            ApiError::PayloadTooLarge { limit: 65536 },
            ApiError::UnsupportedMediaType("text/plain".into()),
            ApiError::NoRoute("/nowhere".into()),
            ApiError::MethodNotAllowed,
            ApiError::Refused(Refused::Missing),
            ApiError::Refused(Refused::Unknown),
            ApiError::Refused(Refused::Revoked),
            ApiError::Refused(Refused::Scope(Scope::Read)),
            ApiError::Unidentified("no client for broker user x".into()),
            ApiError::Forbidden("lacks scope read".into()),
            ApiError::UriTooLong { limit: 8192 },
            ApiError::Overloaded,
            ApiError::TimedOut { secs: 30 },
            ApiError::Panicked("boom".into()),
            ApiError::BadStatus(1000),
            CommandError::not_found("booking", Uuid::nil()).into(),
            CommandError::Conflict("already canceled".into()).into(),
            ApiError::rule("arriveAt", "arriveAt must be after departAt"),
            CommandError::Unprocessable {
                detail: "no field".into(),
                errors: vec![],
            }
            .into(),
            CommandError::IdempotencyMisuse("another body".into()).into(),
            CommandError::Refused("a value was refused by the database".into()).into(),
            CommandError::Unavailable(sql()).into(),
            CommandError::Contended.into(),
            CommandError::Database(sql()).into(),
            CommandError::Render(json()).into(),
        ]
    }

    /// The `Problem` schema of the OpenAPI document is what `body` renders,
    /// for every kind of answer: no field more or less, each of its type.
    #[tokio::test]
    async fn every_problem_body_matches_the_documented_schema() {
        let doc = crate::tests::document().await;
        let mut problem = doc["components"]["schemas"]["Problem"].clone();
        problem["$defs"] = doc["components"]["schemas"].clone();
        let text = problem
            .to_string()
            .replace("#/components/schemas/", "#/$defs/");
        let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
        let validator = jsonschema::draft202012::new(&schema).unwrap();
        for err in every_kind() {
            let body = err.body();
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{body}: {errors:?}");
            assert_eq!(body["status"], err.status().as_u16(), "{body}");
            let kind = body["type"].as_str().unwrap();
            let slug = kind.rsplit('/').next().unwrap();
            assert!(
                problem["properties"]["type"]["description"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("`{slug}`")),
                "the Problem schema lists {slug}"
            );
        }
    }
}
