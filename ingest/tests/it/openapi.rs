//! The HTTP contracts in the repository are what the code serves:
//! `docs/openapi.json` is `GET /openapi.json` (served without a key),
//! `docs/schemas/requests/<type>.json` the JSON Schema of each request body
//! cut out of it; and every documented operation is routed, with no other
//! method on its path.
//!
//! After a change to the API, regenerate the contracts and review the diff:
//!
//! ```sh
//! ENTRIP_UPDATE_CONTRACTS=1 cargo nextest run -p entrip-ingest openapi
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::{Resp, Server, booking_body, into_resp, key, payment_body, unique_code};

const REGENERATE: &str = "ENTRIP_UPDATE_CONTRACTS=1 cargo nextest run -p entrip-ingest openapi";

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// Pretty JSON with a trailing newline, as the contracts are committed.
fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap();
    text.push('\n');
    text
}

/// The document `GET /openapi.json` serves, without a key, as bytes.
async fn served(s: &Server) -> String {
    let resp = reqwest::get(format!("{}/openapi.json", s.base))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "the document is JSON"
    );
    resp.text().await.unwrap()
}

/// Where `expected` and `actual` part, for the failure message.
fn first_difference(expected: &str, actual: &str) -> String {
    let (mut e, mut a) = (expected.lines(), actual.lines());
    for n in 1.. {
        match (e.next(), a.next()) {
            (None, None) => break,
            (x, y) if x == y => {}
            (x, y) => {
                return format!(
                    "line {n}: committed {:?}, served {:?}",
                    x.unwrap_or("<end>"),
                    y.unwrap_or("<end>")
                );
            }
        }
    }
    "only in whitespace".into()
}

/// `docs/openapi.json` and `docs/schemas/requests/*.json` equal what the
/// code serves (or are rewritten, with `ENTRIP_UPDATE_CONTRACTS=1`).
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn openapi_and_request_schemas_in_docs_are_what_ingest_serves(pool: PgPool) {
    let s = Server::start(pool).await;
    let text = served(&s).await;
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "Entrip ingest API");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(text, pretty(&doc), "served pretty-printed, newline-ended");

    let mut wanted: BTreeMap<PathBuf, String> = BTreeMap::new();
    wanted.insert(docs().join("openapi.json"), text);
    let dir = docs().join("schemas/requests");
    for (name, schema) in entrip_ingest::openapi::request_schemas(&doc).unwrap() {
        wanted.insert(dir.join(format!("{name}.json")), pretty(&schema));
    }
    let stale: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json") && !wanted.contains_key(p))
                .collect()
        })
        .unwrap_or_default();

    if std::env::var_os("ENTRIP_UPDATE_CONTRACTS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (path, text) in &wanted {
            std::fs::write(path, text).unwrap();
        }
        for path in &stale {
            std::fs::remove_file(path).unwrap();
        }
        eprintln!("contracts written: {} files", wanted.len());
    } else {
        let mut problems = Vec::new();
        for (path, text) in &wanted {
            match std::fs::read_to_string(path) {
                Ok(committed) if committed == *text => {}
                Ok(committed) => problems.push(format!(
                    "{} differs ({})",
                    path.display(),
                    first_difference(&committed, text)
                )),
                Err(err) => problems.push(format!("{}: {err}", path.display())),
            }
        }
        for path in &stale {
            problems.push(format!("{} is no request body's", path.display()));
        }
        assert!(
            problems.is_empty(),
            "the contracts in docs/ are not what the code serves:\n  {}\nregenerate them with\n  {REGENERATE}\nand review the diff",
            problems.join("\n  ")
        );
    }
    s.stop().await;
}

/// Checks that `r`, the answer to `method path`, is documented: its status
/// among the operation's responses, its JSON body valid against the schema
/// documented for its status and content type.
fn conforms(doc: &Value, path: &str, method: &str, r: &Resp) {
    let case = format!("{} {path} {}", method.to_uppercase(), r.status);
    let responses = &doc["paths"][path][method]["responses"];
    let mut response = responses
        .get(r.status.as_str())
        .unwrap_or_else(|| panic!("{case}: status not documented; {:?}", r.body));
    if let Some(reference) = response["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/responses/");
        response = &doc["components"]["responses"][name];
    }
    let content_type = r.headers["content-type"].to_str().unwrap();
    let Some(schema) = response["content"].get(content_type).map(|c| &c["schema"]) else {
        panic!("{case}: content type {content_type} not documented");
    };
    if !content_type.contains("json") {
        return;
    }
    let mut root = json!({ "$defs": doc["components"]["schemas"] });
    root.as_object_mut()
        .unwrap()
        .extend(schema.as_object().unwrap().clone());
    let root: Value = serde_json::from_str(
        &root
            .to_string()
            .replace("#/components/schemas/", "#/$defs/"),
    )
    .unwrap();
    let validator = jsonschema::draft202012::new(&root).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&r.body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{case}: {errors:?} in {}", r.body);
}

/// The views the API answers with are what the document says, for each
/// operation's success: a user, a booking with and without its payment and
/// approval, a payment and its result, an approval and its decision, a
/// cancellation, a replay.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_success_answer_matches_its_documented_schema(pool: PgPool) {
    let s = Server::start(pool).await;
    let doc: Value = serde_json::from_str(&served(&s).await).unwrap();
    let post = async |path: &str, template: &str, body: Value| {
        let r = s.post(path, Some(&key()), &body).await;
        assert!(r.status.is_success(), "{path}: {:?}", r.body);
        conforms(&doc, template, "post", &r);
        r
    };
    let get = async |path: &str, template: &str| {
        let r = s.get(path).await;
        assert!(r.status.is_success(), "{path}: {:?}", r.body);
        conforms(&doc, template, "get", &r);
        r
    };
    let user = s.create_user().await;
    get(&format!("/v1/users/{user}"), "/v1/users/{id}").await;
    let booking = post(
        "/v1/bookings",
        "/v1/bookings",
        booking_body(&user, &unique_code(), true),
    )
    .await
    .body;
    let id = booking["id"].as_str().unwrap();
    get(&format!("/v1/bookings/{id}"), "/v1/bookings/{id}").await;
    let payment = post("/v1/payments", "/v1/payments", payment_body(&booking))
        .await
        .id();
    get(&format!("/v1/payments/{payment}"), "/v1/payments/{id}").await;
    let approval = post(
        "/v1/approvals",
        "/v1/approvals",
        json!({"bookingId": id, "requesterId": user, "title": "Trip", "reason": "Client visit"}),
    )
    .await
    .id();
    post(
        &format!("/v1/approvals/{approval}/decision"),
        "/v1/approvals/{id}/decision",
        json!({"approverId": user, "decision": "APPROVED"}),
    )
    .await;
    get(&format!("/v1/approvals/{approval}"), "/v1/approvals/{id}").await;
    post(
        &format!("/v1/payments/{payment}/result"),
        "/v1/payments/{id}/result",
        json!({"status": "APPROVED", "approvalId": "PG-1"}),
    )
    .await;
    // With its payment and approval.
    get(&format!("/v1/bookings/{id}"), "/v1/bookings/{id}").await;
    let other = post(
        "/v1/bookings",
        "/v1/bookings",
        booking_body(&user, &unique_code(), false),
    )
    .await
    .id();
    post(
        &format!("/v1/bookings/{other}/cancel"),
        "/v1/bookings/{id}/cancel",
        json!({"reason": "Plans changed"}),
    )
    .await;
    // A replay: the same answer, marked.
    let body = json!({"name": "Lee", "email": "lee@example.com", "phone": "010 1234 5678"});
    let k = key();
    let first = s.post("/v1/users", Some(&k), &body).await;
    let again = s.post("/v1/users", Some(&k), &body).await;
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(first.body, again.body);
    conforms(&doc, "/v1/users", "post", &again);
    for path in ["/healthz", "/readyz", "/metrics"] {
        get(path, path).await;
    }
    s.stop().await;
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Every documented operation is routed (not a 404 `no-route`, not a 405),
/// each with the answers it documents for a request without a key (401) or
/// with one; and no path answers a method it does not document.
#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_documented_operation_is_routed_and_no_other_method(pool: PgPool) {
    let s = Server::start(pool).await;
    let doc: Value = serde_json::from_str(&served(&s).await).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 15, "{:?}", paths.keys());
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path.replace("{id}", &uuid::Uuid::now_v7().to_string());
        for method in METHODS {
            let mut req = s.client.request(
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                format!("{}{concrete}", s.base),
            );
            if method != "get" {
                req = req
                    .header("idempotency-key", key())
                    .header("content-type", "application/json")
                    .body("{}");
            }
            let r = into_resp(req.send().await.unwrap()).await;
            let case = format!("{} {path}", method.to_uppercase());
            let Some(op) = item.get(method) else {
                assert_eq!(
                    r.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{case} is not documented, yet answered {} {:?}",
                    r.status,
                    r.body
                );
                continue;
            };
            operations += 1;
            assert_ne!(
                r.body["type"],
                json!("https://entrip.dev/problems/no-route")
            );
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{case}");
            assert!(op.is_object());
            conforms(&doc, path, method, &r);
            if op.get("security").is_some() {
                // Without a key: the documented 401.
                let r = into_resp(
                    reqwest::Client::new()
                        .request(
                            Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                            format!("{}{concrete}", s.base),
                        )
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{case}");
                conforms(&doc, path, method, &r);
            }
        }
    }
    assert_eq!(operations, 15, "every operation was called");
    s.stop().await;
}
