//! Request parsing shared by every endpoint: the body (size limit, content
//! type, strict JSON with the failing field named), the `Idempotency-Key`
//! and `traceparent` headers, path ids, and a collector of field errors.

use axum::{
    body::Body,
    http::{HeaderMap, header},
};
use entrip_common::domain::{IdempotencyKey, Invalid};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{ApiError, FieldError};

/// Reads the body, refusing more than `limit` bytes with a 413 and a
/// non-JSON content type with a 415.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
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

/// Parses a JSON object into `T` (which denies unknown fields), naming the
/// field at fault. Also returns the body as a `Value` for hashing.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, serde_json::Value), ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| json_error(".", &e))?;
    // serde's derived structs also accept arrays (fields by position).
    if !value.is_object() {
        return Err(ApiError::BadJson {
            detail: "the body must be a JSON object".into(),
            field: None,
        });
    }
    // Typed parsing from the bytes, not the `Value`, so that duplicate keys
    // are caught rather than silently overwritten.
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let typed: T = serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        json_error(&path, &inner)
    })?;
    Ok((typed, value))
}

fn json_error(path: &str, err: &serde_json::Error) -> ApiError {
    let message = strip_position(&err.to_string());
    match err.classify() {
        serde_json::error::Category::Data => {
            // "unknown field `x`, ..." and "duplicate field `x`" name the
            // field themselves; other data errors are at `path`.
            let named = backticked(&message).filter(|_| {
                message.starts_with("unknown field") || message.starts_with("duplicate field")
            });
            // For an unknown key the path already ends with it; a duplicate
            // key is reported at the enclosing object.
            let field = match named {
                Some(name) if path == "." => name.to_owned(),
                _ => path.to_owned(),
            };
            if field == "." {
                return ApiError::BadJson {
                    detail: format!("the body must be a JSON object ({message})"),
                    field: None,
                };
            }
            let message = if message.starts_with("unknown field") {
                "unknown field".to_owned()
            } else if message.starts_with("duplicate field") {
                "field given more than once".to_owned()
            } else {
                message
            };
            ApiError::Validation(vec![FieldError::new(field, message)])
        }
        _ => ApiError::BadJson {
            detail: message,
            field: None,
        },
    }
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn backticked(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// The `Idempotency-Key` header, required on every POST.
pub fn idempotency_key(headers: &HeaderMap) -> Result<IdempotencyKey, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "header is required on every POST",
        ));
    };
    let text = value.to_str().map_err(|_| {
        ApiError::validation("Idempotency-Key", "must be 16-255 visible ASCII characters")
    })?;
    IdempotencyKey::parse(text).map_err(|e| ApiError::validation("Idempotency-Key", e.0))
}

/// A valid W3C `traceparent` header, if one was sent (an invalid one is
/// ignored, as the W3C recommendation says).
pub fn traceparent(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2);
    valid.then(|| value.to_owned())
}

/// A path id: a UUID, else a 400 naming the parameter.
pub fn path_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::validation("id", "must be a UUID"))
}

/// Collects every field error of a request so that one answer lists them all.
#[derive(Debug, Default)]
pub struct Fields {
    errors: Vec<FieldError>,
}

impl Fields {
    /// Records an error for `field`.
    pub fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// The value, or an error "is required" when it is missing or null.
    pub fn required<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.fail(field, "is required");
        }
        value
    }

    /// Parses a required value, recording why it failed.
    pub fn parse<T>(
        &mut self,
        field: &str,
        value: Option<String>,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        let raw = self.required(field, value)?;
        self.check(field, parse(&raw))
    }

    /// Parses an optional value; `None` when it is absent or invalid (an
    /// invalid one is recorded, so `finish` fails).
    pub fn parse_optional<T>(
        &mut self,
        field: &str,
        value: Option<String>,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        let raw = value?;
        self.check(field, parse(&raw))
    }

    /// Keeps the value or records the error.
    pub fn check<T>(&mut self, field: &str, result: Result<T, Invalid>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(Invalid(message)) => {
                self.fail(field, message);
                None
            }
        }
    }

    /// Ends validation: a 400 listing every error, if there is any.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.errors))
        }
    }
}

/// Parses a UUID field.
pub fn uuid_field(raw: &str) -> Result<Uuid, Invalid> {
    Uuid::parse_str(raw).map_err(|_| Invalid("must be a UUID".into()))
}

/// Parses an RFC 3339 time (any offset) into UTC.
pub fn time_field(raw: &str) -> Result<chrono::DateTime<chrono::Utc>, Invalid> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| Invalid("must be an RFC 3339 time such as 2026-12-24T09:30:00Z".into()))
}
