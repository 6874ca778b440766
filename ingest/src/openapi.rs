//! The OpenAPI 3.1 document of the HTTP API, generated from the code: the
//! operations, their bodies and their views from `#[utoipa::path]` on the
//! handlers (`routes.rs`) and `ToSchema` on the types (`requests.rs`,
//! `entrip_common::views`), the routes and their scopes from the router
//! itself (`lib.rs` registers each handler through its documentation, so a
//! route cannot go undocumented), and what every route shares (the
//! `Idempotency-Key` header, the problem answers of `error.rs`, the bearer
//! scheme) from [`document`]. Built once at start-up and served at
//! `GET /openapi.json`. The JSON Schema of each request body is cut out of
//! it by [`request_schemas`].
//!
//! The repository keeps both as `docs/openapi.json` and
//! `docs/schemas/requests/<command type>.json`; ingest's test `openapi`
//! fails when they differ from what the code serves. To regenerate them:
//!
//! ```sh
//! ENTRIP_UPDATE_CONTRACTS=1 cargo nextest run -p entrip-ingest openapi
//! ```

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use utoipa::{
    OpenApi, ToSchema,
    openapi::{
        RefOr,
        schema::{ObjectBuilder, Schema, SchemaFormat, SchemaType, Type},
        security::SecurityRequirement,
    },
};

use crate::{
    auth::Refused,
    clients::Scope,
    error::{ApiError, Problem},
    requests::CommandType,
};

/// The name of the bearer security scheme.
const BEARER: &str = "bearer";

/// Marks every operation of `paths` as needing a bearer key with `scope`
/// (or `*`): called by the router on each route it guards with that scope.
pub(crate) fn require_scope(paths: &mut utoipa::openapi::path::Paths, scope: Scope) {
    for item in paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            let mut security = vec![SecurityRequirement::new(BEARER, [scope.as_str()])];
            if scope != Scope::All {
                security.push(SecurityRequirement::new(BEARER, [Scope::All.as_str()]));
            }
            operation.security = Some(security);
        }
    }
}

/// `GET /healthz`, served by `entrip_common::metrics::router`.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process answers.", content_type = "text/plain; charset=utf-8", body = String, example = "ok"))
)]
#[allow(dead_code)]
fn healthz() {}

/// `GET /metrics`, served by `entrip_common::metrics::router`.
///
/// Prometheus text exposition format; names and labels are fixed by
/// DESIGN.md ("Metrics"). Never shed, no key needed.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Every metric of the process.", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        (status = 500, description = "The metrics could not be encoded (logged).", content_type = "text/plain; charset=utf-8", body = String, example = "cannot encode metrics"),
    )
)]
#[allow(dead_code)]
fn metrics() {}

/// The operations routed by another crate's router, documented here.
#[derive(OpenApi)]
#[openapi(paths(healthz, metrics))]
struct Unrouted;

/// The whole document: the operations the router collected (`api`: the
/// guarded `/v1` routes; `open`: the others), with what they share.
pub(crate) fn document(
    mut api: utoipa::openapi::OpenApi,
    open: utoipa::openapi::OpenApi,
) -> Result<Value, serde_json::Error> {
    api.merge(open);
    api.merge(Unrouted::openapi());
    let mut schemas = Vec::new();
    <Problem as ToSchema>::schemas(&mut schemas);
    let components = api.components.get_or_insert_with(Default::default);
    components.schemas.insert(
        <Problem as ToSchema>::name().into_owned(),
        <Problem as utoipa::PartialSchema>::schema(),
    );
    components.schemas.extend(schemas);
    let mut doc = serde_json::to_value(&api)?;
    doc["info"] = info();
    doc["servers"] = json!([{
        "url": "http://127.0.0.1:8080",
        "description": "ingest.listen's default; every service's address is its own `ingest.listen`"
    }]);
    doc["tags"] = json!([
        { "name": "users", "description": "Users: the customers that book and the people that approve." },
        { "name": "bookings", "description": "Bookings and their cancellation." },
        { "name": "payments", "description": "Payments of bookings and the payment gateway's result." },
        { "name": "approvals", "description": "Approvals of bookings, one step per approver." },
        { "name": "operations", "description": "Health, readiness, metrics and this document: no key needed, never shed." },
    ]);
    let components = &mut doc["components"];
    if let Some(schemas) = components["schemas"].as_object_mut() {
        for schema in schemas.values_mut() {
            // utoipa leaves `type` out of a struct's schema: without it a
            // bare `0` would be a valid body.
            if schema.get("properties").is_some() && schema.get("type").is_none() {
                schema["type"] = json!("object");
            }
        }
        // The views always carry every field, `null` when it has no value
        // (the event schemas say the same): all of them are required.
        for (name, schema) in schemas.iter_mut() {
            if !(name.ends_with("View") || name == "BookingDetail") {
                continue;
            }
            let parts: Vec<&mut Value> = if schema.get("allOf").is_some() {
                match schema.get_mut("allOf") {
                    Some(Value::Array(all)) => all.iter_mut().collect(),
                    _ => Vec::new(),
                }
            } else {
                vec![schema]
            };
            for part in parts {
                if let Some(Value::Object(props)) = part.get("properties") {
                    let every: Vec<Value> = props.keys().cloned().map(Value::from).collect();
                    part["required"] = Value::Array(every);
                }
            }
        }
        for (name, fields, default) in [
            ("CreateBookingBody", &["amount"][..], Some("KRW")),
            ("CreatePaymentBody", &["amount", "tax"][..], None),
        ] {
            if let Some(schema) = schemas.get_mut(name) {
                schema["allOf"] = fields::decimals_by_currency(fields, default);
            }
        }
    }
    components["securitySchemes"] = json!({ BEARER: bearer_scheme() });
    components["parameters"] = json!({
        "IdempotencyKey": idempotency_key(),
        "Id": {
            "name": "id",
            "in": "path",
            "required": true,
            "description": "The entity's id.",
            "schema": fields::uuid(false, "A UUID"),
        },
    });
    components["headers"] = headers();
    components["responses"] = shared_responses();
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, operation) in item.iter_mut() {
                complete_operation(path, method, operation);
            }
        }
    }
    Ok(doc)
}

fn info() -> Value {
    json!({
        "title": "Entrip ingest API",
        "version": env!("CARGO_PKG_VERSION"),
        "license": { "name": "MIT", "identifier": "MIT" },
        "description": concat!(
            "Ingest validates the requests of upstream systems and stores each accepted change ",
            "with its audit row, its outbox event and its idempotency record in one PostgreSQL ",
            "transaction (docs/DESIGN.md, \"HTTP API\"; docs/http-api.md).\n\n",
            "JSON with camelCase fields, UTC RFC 3339 times, money as decimal strings at the ",
            "currency's scale, ids as UUIDs. Unknown fields are refused. Every POST needs an ",
            "`Idempotency-Key`: the same key with the same body answers the stored response again ",
            "(`Idempotent-Replayed: true`), with another body or endpoint 422.\n\n",
            "Every error is `application/problem+json` (RFC 9457, schema `Problem`). Besides the ",
            "answers listed per operation, any route answers 405 (problem+json) to a method it ",
            "does not have, 404 (`no-route`) to a path that is not here, and 431 (no body, the ",
            "connection closed) to a request head over `ingest.max_header_bytes` (16 KiB). ",
            "The JSON Schema of each request body, for forms to check with the server's rules, ",
            "is in docs/schemas/requests/ (docs/schemas/README.md says where a rule is beyond ",
            "JSON Schema)."
        ),
    })
}

fn bearer_scheme() -> Value {
    let scopes: Vec<String> = Scope::EVERY
        .iter()
        .map(|s| format!("`{}`", s.as_str()))
        .collect();
    json!({
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "entrip_<12 hex digits>_<64 hex digits>",
        "description": format!(
            "An API key of an API client (`ingest clients create NAME --scopes S,S...`). \
             Each operation names the scope it needs; `*` grants every scope. Scopes: {}. \
             A missing, unknown or revoked key is answered 401, a key without the scope 403, \
             both with `WWW-Authenticate`.",
            scopes.join(", ")
        ),
    })
}

fn idempotency_key() -> Value {
    json!({
        "name": "Idempotency-Key",
        "in": "header",
        "required": true,
        "description": "16-255 visible ASCII characters, unique per request of the client \
            (a UUID will do). The same key with the same body and endpoint answers the \
            stored response again, with `Idempotent-Replayed: true`; with another body or \
            endpoint, 422. Keys are the client's own and expire after \
            `ingest.idempotency_ttl_secs` (24 h).",
        "schema": {
            "type": "string",
            "minLength": 16,
            "maxLength": 255,
            "pattern": "^[!-~]{16,255}$",
        },
        "example": "8f14e45f-ceea-467f-a0e6-6b7d2c3a9b01",
    })
}

fn headers() -> Value {
    json!({
        "IdempotentReplayed": {
            "description": "`true` when this is the stored answer of an earlier request with \
                the same Idempotency-Key (nothing was done again); absent otherwise.",
            "schema": { "type": "string", "enum": ["true"] },
        },
        "RetryAfter": {
            "description": "Seconds to wait before retrying with the same Idempotency-Key \
                (`ingest.retry_after_secs`).",
            "required": true,
            "schema": { "type": "integer", "minimum": 0 },
            "example": 5,
        },
        "WWWAuthenticate": {
            "description": "The bearer challenge (RFC 6750): `Bearer realm=\"entrip\"` for a \
                missing key, with `error=\"invalid_token\"` for an unknown or revoked one, \
                with `error=\"insufficient_scope\", scope=\"...\"` for a key without the \
                route's scope.",
            "required": true,
            "schema": { "type": "string" },
            "example": "Bearer realm=\"entrip\", error=\"insufficient_scope\", scope=\"bookings:write\"",
        },
    })
}

/// A problem+json answer of `status`, with an example rendered by `error.rs`.
fn problem(description: &str, example: &ApiError) -> Value {
    json!({
        "description": description,
        "content": {
            "application/problem+json": {
                "schema": { "$ref": "#/components/schemas/Problem" },
                "example": example.body(),
            }
        },
    })
}

/// The answers every route of a kind shares, referenced by status.
fn shared_responses() -> Value {
    let mut unauthorized = problem(
        "No `Authorization: Bearer` key, or an unknown or revoked one.",
        &ApiError::Refused(Refused::Missing),
    );
    unauthorized["headers"] = json!({
        "WWW-Authenticate": { "$ref": "#/components/headers/WWWAuthenticate" }
    });
    let mut forbidden = problem(
        "The key lacks the operation's scope.",
        &ApiError::Refused(Refused::Scope(Scope::BookingsWrite)),
    );
    forbidden["headers"] = unauthorized["headers"].clone();
    let mut unavailable = problem(
        "Not served now, nothing stored: the database is unavailable, the in-flight limit \
         is reached (`ingest.max_in_flight`; answered at once), or the request ran past \
         `ingest.request_timeout_secs`. Retry after `Retry-After` seconds with the same \
         Idempotency-Key.",
        &ApiError::Overloaded,
    );
    unavailable["headers"] = json!({
        "Retry-After": { "$ref": "#/components/headers/RetryAfter" }
    });
    json!({
        "Unauthorized": unauthorized,
        "Forbidden": forbidden,
        "PayloadTooLarge": problem(
            "The body is over `ingest.body_limit_bytes` (64 KiB).",
            &ApiError::PayloadTooLarge { limit: 64 * 1024 },
        ),
        "UriTooLong": problem(
            "The request URI is over `ingest.max_uri_bytes` (8 KiB).",
            &ApiError::UriTooLong { limit: 8 * 1024 },
        ),
        "UnsupportedMediaType": problem(
            "A `Content-Type` that is not JSON (`application/json` or `*/*+json`).",
            &ApiError::UnsupportedMediaType("text/plain; send application/json".into()),
        ),
        "Unavailable": unavailable,
        "Internal": problem(
            "A fault of the service itself (logged); the request stored nothing.",
            &ApiError::Panicked(String::new()),
        ),
    })
}

/// Adds to one operation what its kind of route shares: the path id and
/// the `Idempotency-Key` parameters, the replay header of a POST's answer,
/// and the problem answers (each 4xx/5xx the handler declares gets the
/// problem+json body).
fn complete_operation(path: &str, method: &str, operation: &mut Value) {
    let post = method == "post";
    let has_id = path.contains("{id}");
    let guarded = operation.get("security").is_some();
    let api = path.starts_with("/v1/");
    let mut parameters = Vec::new();
    if has_id {
        parameters.push(json!({ "$ref": "#/components/parameters/Id" }));
    }
    if post {
        parameters.push(json!({ "$ref": "#/components/parameters/IdempotencyKey" }));
    }
    if !parameters.is_empty() {
        operation["parameters"] = Value::Array(parameters);
    }
    let Some(responses) = operation["responses"].as_object_mut() else {
        return;
    };
    if post {
        for (status, response) in responses.iter_mut() {
            if status.starts_with('2') {
                response["headers"]["Idempotent-Replayed"] =
                    json!({ "$ref": "#/components/headers/IdempotentReplayed" });
            }
        }
    }
    let bad_request = match (post, has_id) {
        (true, true) => Some(
            "Refused before any work: malformed JSON, a body that is not an object, an unknown, \
             repeated, mistyped, missing or invalid field, a missing or malformed \
             Idempotency-Key, or a path id that is not a UUID; `errors` names each field \
             (`Idempotency-Key`, `id` for those two).",
        ),
        (true, false) => Some(
            "Refused before any work: malformed JSON, a body that is not an object, an unknown, \
             repeated, mistyped, missing or invalid field, or a missing or malformed \
             Idempotency-Key; `errors` names each field (`Idempotency-Key` for the header).",
        ),
        (false, true) => Some("The path id is not a UUID (`errors` names `id`)."),
        (false, false) => None,
    };
    if let Some(description) = bad_request {
        let example = ApiError::Validation(vec![crate::requests::FieldError::new(
            if has_id && !post {
                "id"
            } else {
                "Idempotency-Key"
            },
            if has_id && !post {
                "must be a UUID"
            } else {
                "header is required on every POST"
            },
        )]);
        responses.insert("400".into(), problem(description, &example));
    }
    let mut shared = vec![("414", "UriTooLong"), ("500", "Internal")];
    if guarded {
        shared.extend([("401", "Unauthorized"), ("403", "Forbidden")]);
    }
    if post {
        shared.extend([("413", "PayloadTooLarge"), ("415", "UnsupportedMediaType")]);
    }
    if api || responses.contains_key("503") {
        shared.push(("503", "Unavailable"));
    }
    for (status, name) in shared {
        match responses.get_mut(status) {
            // The handler's own description of the status; the shared
            // headers still apply.
            Some(own) => {
                let header = match status {
                    "503" => Some(("Retry-After", "RetryAfter")),
                    "401" | "403" => Some(("WWW-Authenticate", "WWWAuthenticate")),
                    _ => None,
                };
                if let Some((header, component)) = header {
                    own["headers"][header] =
                        json!({ "$ref": format!("#/components/headers/{component}") });
                }
            }
            None => {
                responses.insert(
                    status.into(),
                    json!({ "$ref": format!("#/components/responses/{name}") }),
                );
            }
        }
    }
    if post {
        let misuse = "The Idempotency-Key was used before with another body or endpoint.";
        match responses.get_mut("422") {
            Some(own) => {
                let text = own["description"].as_str().unwrap_or_default();
                own["description"] = json!(format!("{text} Or: {misuse}"));
            }
            None => {
                responses.insert("422".into(), json!({ "description": misuse }));
            }
        }
    }
    for (status, response) in responses.iter_mut() {
        let error = status.starts_with('4') || status.starts_with('5');
        if error && response.get("$ref").is_none() && response.get("content").is_none() {
            response["content"] = json!({
                "application/problem+json": {
                    "schema": { "$ref": "#/components/schemas/Problem" }
                }
            });
        }
    }
}

/// The JSON Schema (2020-12) of each request body, by its file name in
/// `docs/schemas/requests/` (the AMQP command type: `booking.create`, …):
/// the body's schema in the OpenAPI document `spec` with every `$ref`
/// resolved, so that each file stands alone.
pub fn request_schemas(spec: &Value) -> Result<BTreeMap<String, Value>, String> {
    let components = &spec["components"]["schemas"];
    let mut out = BTreeMap::new();
    for kind in CommandType::EVERY {
        let name = kind.body_schema();
        let body = components
            .get(&name)
            .ok_or_else(|| format!("no schema {name} in the document"))?;
        let body = resolve(body, components, 0)?;
        let Value::Object(body) = body else {
            return Err(format!("schema {name} is not an object"));
        };
        let mut schema = Map::new();
        schema.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        schema.insert("title".into(), json!(kind.as_str()));
        let own = body
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let entity = if kind.on_entity() {
            " (the entity's id is in the path, or in header `x-entrip-entity-id`)"
        } else {
            ""
        };
        schema.insert(
            "description".into(),
            json!(format!(
                "The body of `POST {}` and of the AMQP command `{}`{entity}. {own} \
                 Generated from the code with docs/openapi.json; what the server checks \
                 beyond this schema is in docs/schemas/README.md.",
                kind.route(),
                kind.as_str()
            )),
        );
        for (key, value) in body {
            if key != "description" {
                schema.insert(key, value);
            }
        }
        out.insert(kind.as_str().to_owned(), Value::Object(schema));
    }
    Ok(out)
}

/// `schema` with every `#/components/schemas/…` reference replaced by the
/// schema it names (keywords beside the `$ref` win).
fn resolve(schema: &Value, components: &Value, depth: usize) -> Result<Value, String> {
    if depth > 32 {
        return Err("references nest too deep (a cycle?)".into());
    }
    Ok(match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
                let name = reference
                    .strip_prefix("#/components/schemas/")
                    .ok_or_else(|| format!("unsupported reference {reference}"))?;
                let target = components
                    .get(name)
                    .ok_or_else(|| format!("reference to a missing schema {name}"))?;
                if let Value::Object(target) = resolve(target, components, depth + 1)? {
                    out = target;
                }
            }
            for (key, value) in map {
                if key != "$ref" {
                    out.insert(key.clone(), resolve(value, components, depth + 1)?);
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve(v, components, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}

/// The schemas of request body fields: what `requests.rs` and the domain
/// types of `entrip_common::domain` accept, as closely as JSON Schema
/// (ECMA-262 patterns) can say it; docs/schemas/README.md lists where it
/// cannot. Optional fields accept `null`, as the server does (null is
/// taken as absent).
pub(crate) mod fields {
    use super::*;

    /// Unicode White_Space, what Rust's `str::trim` removes.
    const WS: &str = r"\t-\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";
    /// Neither White_Space nor a control character (Unicode Cc).
    const SOLID: &str =
        r"[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]";
    /// Not a control character, or a tab or a newline.
    const PRINTABLE: &str = r"[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]";

    fn string(nullable: bool) -> ObjectBuilder {
        ObjectBuilder::new().schema_type(if nullable {
            SchemaType::from_iter([Type::String, Type::Null])
        } else {
            SchemaType::new(Type::String)
        })
    }

    /// `Text::parse(_, max)`: trimmed, 1 to `max` characters, no control
    /// characters but tab and newline.
    pub(crate) fn text(max: usize, nullable: bool, what: &str) -> RefOr<Schema> {
        let inner = max.saturating_sub(2);
        string(nullable)
            .min_length(Some(1))
            .pattern(Some(format!(
                "^[{WS}]*{SOLID}(?:{PRINTABLE}{{0,{inner}}}{SOLID})?[{WS}]*$"
            )))
            .description(Some(format!(
                "{what}: 1-{max} characters once surrounding whitespace is trimmed, without \
                 control characters (tab and newline allowed)."
            )))
            .into()
    }

    /// `BookingCode::parse`.
    pub(crate) fn booking_code() -> RefOr<Schema> {
        string(false)
            .min_length(Some(6))
            .max_length(Some(32))
            .pattern(Some(r"^[A-Z0-9\-]{6,32}$"))
            .description(Some(
                "The booking's code, unique: 6-32 characters of A-Z, 0-9 and '-'.",
            ))
            .examples(["BK-2026-000123"])
            .into()
    }

    /// `Phone::parse`: trimmed, 7-20 of digits, spaces and `+-()`, a digit.
    pub(crate) fn phone(what: &str) -> RefOr<Schema> {
        string(false)
            .pattern(Some(format!(
                r"^[{WS}]*(?=[^0-9]*[0-9])[0-9+\(\)\-][0-9 +\(\)\-]{{5,18}}[0-9+\(\)\-][{WS}]*$"
            )))
            .description(Some(format!(
                "{what}: 7-20 characters of digits, spaces and +-() with at least one digit, \
                 once surrounding whitespace is trimmed."
            )))
            .examples(["+82 10 1234 5678"])
            .into()
    }

    /// `Email::parse`: `local@domain.tld`, trimmed, at most 254 characters.
    pub(crate) fn email() -> RefOr<Schema> {
        let part =
            r"[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000@]";
        let edge =
            r"[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000@.]";
        // No `format: email`: RFC 5321 is stricter than the server (which
        // takes `a*b@x.com`), and a validator that checks formats would then
        // refuse what the server accepts; the pattern is the server's rule.
        string(false)
            .pattern(Some(format!(
                "^[{WS}]*(?=[^{WS}]{{1,254}}[{WS}]*$){part}+@{edge}{part}*\\.{part}*{edge}[{WS}]*$"
            )))
            .description(Some(
                "The user's e-mail address, unique: local@domain with a dot inside the domain, \
                 no whitespace or control characters, at most 254 bytes once surrounding \
                 whitespace is trimmed.",
            ))
            .examples(["kim@example.com"])
            .into()
    }

    /// A UUID (`Uuid::parse_str`), in its hyphenated form.
    pub(crate) fn uuid(nullable: bool, what: &str) -> RefOr<Schema> {
        string(nullable)
            .format(Some(SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Uuid,
            )))
            .pattern(Some(
                "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
            ))
            .description(Some(format!("{what} (a UUID).")))
            .examples(["0193a5e2-7c4b-7d10-9a3e-5f6b7c8d9e0f"])
            .into()
    }

    /// An RFC 3339 time with an offset (`DateTime::parse_from_rfc3339`).
    pub(crate) fn time(what: &str) -> RefOr<Schema> {
        string(false)
            .format(Some(SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::DateTime,
            )))
            .pattern(Some(
                r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt ](?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[Zz]|[+\-\u2212](?:[01][0-9]|2[0-3]):[0-5][0-9])$",
            ))
            .description(Some(format!(
                "{what}: an RFC 3339 time with its offset, e.g. 2026-12-24T09:30:00+09:00."
            )))
            .examples(["2026-12-24T09:30:00+09:00"])
            .into()
    }

    /// Digits of a positive decimal with at most 16 integer digits and 2
    /// significant decimals (`Money::parse`, at most `numeric(18,2)`).
    const POSITIVE: &str = r"0*(?:[1-9][0-9]{0,15}(?:\.[0-9]{0,2}0*)?|\.(?:0[1-9]|[1-9][0-9]?)0*)";

    /// `Money::parse`: a decimal string greater than 0.
    pub(crate) fn amount(what: &str) -> RefOr<Schema> {
        string(false)
            .max_length(Some(40))
            .pattern(Some(format!("^{POSITIVE}$")))
            .description(Some(format!(
                "{what}: a decimal string greater than 0, at most 9999999999999999.99, with no \
                 more decimals than the currency has (KRW and JPY 0, USD and EUR 2; trailing \
                 zeros do not count)."
            )))
            .examples(["350000", "129.90"])
            .into()
    }

    /// `Money::parse_non_negative`: a decimal string, 0 or more.
    pub(crate) fn tax(what: &str) -> RefOr<Schema> {
        string(false)
            .max_length(Some(40))
            .pattern(Some(format!(r"^(?:{POSITIVE}|-?(?:0+\.?0*|0*\.0+))$")))
            .description(Some(format!(
                "{what}: a decimal string, 0 or more, at most the amount, with no more decimals \
                 than the currency has."
            )))
            .examples(["31818", "0"])
            .into()
    }

    /// The codes `Currency::parse` accepts: ISO 4217 currencies of
    /// payment with at most 2 minor units.
    fn currency_codes() -> Vec<String> {
        let letters = b'A'..=b'Z';
        let mut codes = Vec::new();
        for a in letters.clone() {
            for b in letters.clone() {
                for c in letters.clone() {
                    let code = String::from_utf8_lossy(&[a, b, c]).into_owned();
                    if entrip_common::domain::Currency::parse(&code).is_ok() {
                        codes.push(code);
                    }
                }
            }
        }
        codes
    }

    /// The rule across fields that `Money::parse` applies: no more decimals
    /// in `amounts` than their currency has (trailing zeros do not count),
    /// the currency being `default` when absent or null. One `if`/`then`
    /// per number of minor units.
    pub(crate) fn decimals_by_currency(amounts: &[&str], default: Option<&str>) -> Value {
        let mut by_units: BTreeMap<u32, Vec<Value>> = BTreeMap::new();
        for code in currency_codes() {
            if let Ok(c) = entrip_common::domain::Currency::parse(&code) {
                by_units
                    .entry(c.minor_units())
                    .or_default()
                    .push(code.into());
            }
        }
        let default_units = default
            .and_then(|d| entrip_common::domain::Currency::parse(d).ok())
            .map(|c| c.minor_units());
        by_units
            .into_iter()
            .map(|(units, mut codes)| {
                // Absent is fine for `properties`; null stands for the default.
                let condition = if Some(units) == default_units {
                    codes.push(Value::Null);
                    json!({ "properties": { "currency": { "enum": codes } } })
                } else {
                    json!({ "required": ["currency"], "properties": { "currency": { "enum": codes } } })
                };
                let too_many = format!(r"\.[0-9]{{{units}}}[0-9]*[1-9]");
                let properties: serde_json::Map<String, Value> = amounts
                    .iter()
                    .map(|f| ((*f).to_owned(), json!({ "not": { "pattern": too_many } })))
                    .collect();
                json!({
                    "if": condition,
                    "then": { "properties": properties },
                    "description": format!("Currencies with {units} minor units: at most {units} decimals."),
                })
            })
            .collect()
    }

    /// A currency; `default` when absent or null.
    pub(crate) fn currency(default: Option<&str>) -> RefOr<Schema> {
        let mut values: Vec<Value> = currency_codes().into_iter().map(Value::from).collect();
        if default.is_some() {
            values.push(Value::Null);
        }
        let mut schema = string(default.is_some())
            .enum_values(Some(values))
            .description(Some(format!(
                "An ISO 4217 currency with at most 2 minor units{}.",
                default.map_or(String::new(), |d| format!(", {d} when absent"))
            )))
            .examples(["KRW"]);
        if let Some(d) = default {
            schema = schema.default(Some(json!(d)));
        }
        schema.into()
    }

    /// An optional flag, `false` when absent or null.
    pub(crate) fn flag(what: &str) -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Boolean, Type::Null]))
            .default(Some(json!(false)))
            .description(Some(format!("{what}; false when absent.")))
            .into()
    }

    /// An optional integer in `range`, `default` when absent or null.
    pub(crate) fn integer(
        range: std::ops::RangeInclusive<i64>,
        default: i64,
        what: &str,
    ) -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
            .minimum(Some(*range.start()))
            .maximum(Some(*range.end()))
            .default(Some(json!(default)))
            .description(Some(format!(
                "{what}: {}-{}, {default} when absent.",
                range.start(),
                range.end()
            )))
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vocabularies are documented by their wire names.
    #[tokio::test]
    async fn vocabularies_are_documented_as_they_are_sent() {
        let doc = crate::tests::document().await;
        let schemas = &doc["components"]["schemas"];
        for (name, wire) in [
            ("Decision", json!(["APPROVED", "REJECTED"])),
            ("BookingStatus", json!(["PENDING", "CONFIRMED", "CANCELED"])),
            ("PaymentStatus", json!(["PENDING", "APPROVED", "FAILED"])),
            ("PaymentOutcome", json!(["APPROVED", "FAILED"])),
            ("ApprovalStatus", json!(["PENDING", "APPROVED", "REJECTED"])),
            (
                "PaymentMethod",
                json!([
                    "CARD",
                    "BANK_TRANSFER",
                    "VIRTUAL_ACCOUNT",
                    "MOBILE",
                    "POINTS"
                ]),
            ),
        ] {
            assert_eq!(schemas[name]["enum"], wire, "{name}");
        }
    }

    /// Each request schema stands alone and is a valid JSON Schema 2020-12.
    #[tokio::test]
    async fn request_schemas_are_standalone_2020_12_schemas() {
        let doc = crate::tests::document().await;
        let schemas = request_schemas(&doc).unwrap();
        assert_eq!(schemas.len(), CommandType::EVERY.len());
        for (name, schema) in &schemas {
            assert!(!schema.to_string().contains("$ref"), "{name}");
            assert_eq!(schema["additionalProperties"], json!(false), "{name}");
            jsonschema::draft202012::meta::validate(schema)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            jsonschema::draft202012::new(schema).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// The field patterns agree with the domain's parsers on samples (the
    /// property test `request_schemas` checks them through the server).
    #[test]
    fn field_patterns_agree_with_the_domain_parsers() {
        use entrip_common::domain::{BookingCode, Email, Phone, Text};
        let check = |schema: RefOr<Schema>, samples: &[&str], parse: &dyn Fn(&str) -> bool| {
            let schema = serde_json::to_value(schema).unwrap();
            let validator = jsonschema::draft202012::new(&schema).unwrap();
            for s in samples {
                assert_eq!(
                    validator.is_valid(&json!(s)),
                    parse(s),
                    "{s:?} against {}",
                    schema["pattern"]
                );
            }
        };
        check(
            fields::text(5, false, "t"),
            &[
                "a",
                " a ",
                "abcde",
                "abcdef",
                " abcde\r",
                "",
                "  ",
                "a\u{1}",
                "a\nb",
                "\u{85}x\u{85}",
                "a\rb",
            ],
            &|s| Text::parse(s, 5).is_ok(),
        );
        check(
            fields::phone("p"),
            &[
                "1234567",
                " 1234567 ",
                "123456",
                "+++++++",
                "(02) 123-4567",
                "1 2 3 4",
                "12345678901234567890",
                "123456789012345678901",
            ],
            &|s| Phone::parse(s).is_ok(),
        );
        check(
            fields::email(),
            &[
                "kim@example.com",
                " kim@example.com\n",
                "kim",
                "kim@localhost",
                "a b@x.com",
                "a@b@c.com",
                "kim@.com",
                "kim@x.",
                "kim@x..y",
                "김@예.한국",
            ],
            &|s| Email::parse(s).is_ok(),
        );
        check(
            fields::booking_code(),
            &[
                "ABC-123",
                "ABCDE",
                "abc-123",
                "ABC_123",
                &"A".repeat(32),
                &"A".repeat(33),
            ],
            &|s| BookingCode::parse(s).is_ok(),
        );
    }
}
