//! The front door: every `/v1` route lets in only a known, unrevoked key
//! with the route's scope, refuses the rest with 401/403 problem+json and
//! stores nothing for them; idempotency keys are scoped by client; keys
//! rotate without downtime; the table holds nothing that authenticates.

use std::time::{Duration, Instant};

use entrip_ingest::clients::{self, ClientName, Scope};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::{
    Resp, Server, booking_body, into_resp, issue_key, key, payment_body, settings, unique_code,
};

/// A request with the given `Authorization` header value (`None`: none).
async fn call(
    s: &Server,
    auth: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Resp {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", s.base));
    if let Some(value) = auth {
        req = req.header("authorization", value);
    }
    if let Some(body) = body {
        req = req
            .header("idempotency-key", key())
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    into_resp(req.send().await.unwrap()).await
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Rows of every table a request could write.
async fn stored(s: &Server) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "users",
        "bookings",
        "payments",
        "approvals",
        "approval_decisions",
        "audit_log",
        "outbox",
        "idempotency_keys",
    ] {
        counts.push(s.count(table).await);
    }
    counts
}

struct Route {
    method: Method,
    path: String,
    scope: Scope,
    body: Option<Value>,
    success: StatusCode,
}

/// Every route of the API with an entity to act on, so that its request
/// succeeds when let in.
async fn routes(s: &Server) -> Vec<Route> {
    let user = s.create_user().await;
    let to_cancel = s.create_booking(&user, false).await;
    let to_pay = s.create_booking(&user, false).await;
    let paid = s.create_booking(&user, false).await;
    let payment = s.create_payment(&paid).await;
    let to_approve = s.create_booking(&user, true).await;
    let approved = s.create_booking(&user, true).await;
    let approver = s.create_user().await;
    let approval = s
        .post(
            "/v1/approvals",
            Some(&key()),
            &json!({"bookingId": approved["id"], "requesterId": user, "title": "Trip", "reason": "Meeting"}),
        )
        .await;
    assert_eq!(approval.status, StatusCode::CREATED, "{:?}", approval.body);
    let approval = approval.id();
    let route = |method: Method, path: String, scope, body: Option<Value>, success| Route {
        method,
        path,
        scope,
        body,
        success,
    };
    let email = format!("lee-{}@example.com", uuid::Uuid::new_v4().simple());
    vec![
        route(
            Method::POST,
            "/v1/users".into(),
            Scope::UsersWrite,
            Some(json!({"name": "Lee", "email": email, "phone": "010 2222 3333"})),
            StatusCode::CREATED,
        ),
        route(
            Method::GET,
            format!("/v1/users/{user}"),
            Scope::Read,
            None,
            StatusCode::OK,
        ),
        route(
            Method::POST,
            "/v1/bookings".into(),
            Scope::BookingsWrite,
            Some(booking_body(&user, &unique_code(), false)),
            StatusCode::CREATED,
        ),
        route(
            Method::GET,
            format!("/v1/bookings/{}", to_cancel["id"].as_str().unwrap()),
            Scope::Read,
            None,
            StatusCode::OK,
        ),
        route(
            Method::POST,
            format!("/v1/bookings/{}/cancel", to_cancel["id"].as_str().unwrap()),
            Scope::BookingsWrite,
            Some(json!({"reason": "plans changed"})),
            StatusCode::OK,
        ),
        route(
            Method::POST,
            "/v1/payments".into(),
            Scope::PaymentsWrite,
            Some(payment_body(&to_pay)),
            StatusCode::CREATED,
        ),
        route(
            Method::GET,
            format!("/v1/payments/{}", payment["id"].as_str().unwrap()),
            Scope::Read,
            None,
            StatusCode::OK,
        ),
        route(
            Method::POST,
            format!("/v1/payments/{}/result", payment["id"].as_str().unwrap()),
            Scope::PaymentsResult,
            Some(json!({"status": "FAILED", "reason": "card declined"})),
            StatusCode::OK,
        ),
        route(
            Method::POST,
            "/v1/approvals".into(),
            Scope::ApprovalsWrite,
            Some(
                json!({"bookingId": to_approve["id"], "requesterId": user, "title": "Trip", "reason": "Meeting"}),
            ),
            StatusCode::CREATED,
        ),
        route(
            Method::GET,
            format!("/v1/approvals/{approval}"),
            Scope::Read,
            None,
            StatusCode::OK,
        ),
        route(
            Method::POST,
            format!("/v1/approvals/{approval}/decision"),
            Scope::ApprovalsDecide,
            Some(json!({"approverId": approver, "decision": "APPROVED", "reason": "fine"})),
            StatusCode::OK,
        ),
    ]
}

fn client_name(scope: Scope) -> String {
    format!("only-{}", scope.as_str().replace(':', "-"))
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn every_route_refuses_missing_unknown_revoked_and_unscoped_keys_and_stores_nothing(
    pool: PgPool,
) {
    let s = Server::start(pool.clone()).await;
    let routes = routes(&s).await;
    let mut scoped = std::collections::HashMap::new();
    for scope in Scope::EVERY.into_iter().filter(|s| *s != Scope::All) {
        scoped.insert(scope, issue_key(&pool, &client_name(scope), &[scope]).await);
    }
    let revoked = issue_key(&pool, "revoked", &[Scope::All]).await;
    clients::revoke(&pool, &ClientName::parse("revoked").unwrap(), None)
        .await
        .unwrap();
    let real = clients::list(&pool).await.unwrap();
    let a_prefix = &real.iter().find(|k| k.name == "test-all").unwrap().prefix;
    let wrong_secret = format!("entrip_{a_prefix}_{}", "0".repeat(64));
    let unknown_prefix = format!("entrip_0123456789ab_{}", "f".repeat(64));

    for route in &routes {
        let what = format!("{} {}", route.method, route.path);
        let wrong_scope = if route.scope == Scope::Read {
            &scoped[&Scope::UsersWrite]
        } else {
            &scoped[&Scope::Read]
        };
        let refusals: [(Option<String>, StatusCode, &str); 7] = [
            (None, StatusCode::UNAUTHORIZED, "missing"),
            (
                Some("Basic dXNlcjpwdw==".into()),
                StatusCode::UNAUTHORIZED,
                "missing",
            ),
            (
                Some(bearer("not-a-key")),
                StatusCode::UNAUTHORIZED,
                "unknown",
            ),
            (
                Some(bearer(&unknown_prefix)),
                StatusCode::UNAUTHORIZED,
                "unknown",
            ),
            (
                Some(bearer(&wrong_secret)),
                StatusCode::UNAUTHORIZED,
                "unknown",
            ),
            (Some(bearer(&revoked)), StatusCode::UNAUTHORIZED, "revoked"),
            (Some(bearer(wrong_scope)), StatusCode::FORBIDDEN, "scope"),
        ];
        for (auth, status, reason) in refusals {
            let before = stored(&s).await;
            let r = call(
                &s,
                auth.as_deref(),
                route.method.clone(),
                &route.path,
                route.body.as_ref(),
            )
            .await;
            assert_eq!(r.status, status, "{what} with {reason}: {:?}", r.body);
            assert!(r.is_problem(), "{what}: {:?}", r.body);
            let challenge = r.headers["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
            if status == StatusCode::FORBIDDEN {
                assert!(
                    challenge.contains("insufficient_scope")
                        && challenge.contains(route.scope.as_str()),
                    "{what}: {challenge}"
                );
            }
            assert_eq!(stored(&s).await, before, "{what} with {reason} stored rows");
        }
        let r = call(
            &s,
            Some(&bearer(&scoped[&route.scope])),
            route.method.clone(),
            &route.path,
            route.body.as_ref(),
        )
        .await;
        assert_eq!(
            r.status, route.success,
            "{what} with its scope: {:?}",
            r.body
        );
    }
    // The ones that wrote name their client in the audit log.
    for scope in [Scope::UsersWrite, Scope::PaymentsResult] {
        let actor = format!("client:{}", client_name(scope));
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE actor = $1 AND detail->>'client' = $2",
        )
        .bind(&actor)
        .bind(client_name(scope))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(rows, 1, "{actor}");
    }
    let n = routes.len() as f64;
    for (reason, count) in [
        ("missing", 2.0),
        ("unknown", 3.0),
        ("revoked", 1.0),
        ("scope", 1.0),
    ] {
        assert_eq!(
            s.metric(&format!(
                "entrip_ingest_auth_failures_total{{reason=\"{reason}\"}}"
            ))
            .await,
            count * n,
            "{reason}"
        );
    }
    // Health, readiness, metrics and the OpenAPI document need no key.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let r = call(&s, None, Method::GET, path, None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
    }
    s.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn two_clients_with_one_idempotency_key_get_two_effects_and_their_own_answers(pool: PgPool) {
    let s = Server::start(pool.clone()).await;
    let a = crate::support::authenticated(&issue_key(&pool, "client-a", &[Scope::All]).await);
    let b = crate::support::authenticated(&issue_key(&pool, "client-b", &[Scope::All]).await);
    let post = |client: &reqwest::Client, k: &str, body: &Value| {
        client
            .post(format!("{}/v1/users", s.base))
            .header("idempotency-key", k)
            .json(body)
            .send()
    };
    let user = |n: &str| json!({"name": "Han", "email": format!("han-{n}-{}@example.com", uuid::Uuid::new_v4().simple()), "phone": "010 4444 5555"});

    // Different bodies: two users, each client replays its own.
    let k = key();
    let (body_a, body_b) = (user("a"), user("b"));
    let ra = into_resp(post(&a, &k, &body_a).await.unwrap()).await;
    let rb = into_resp(post(&b, &k, &body_b).await.unwrap()).await;
    assert_eq!(
        (ra.status, rb.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_ne!(ra.id(), rb.id());
    assert!(rb.headers.get("idempotent-replayed").is_none());
    for (client, body, first) in [(&a, &body_a, &ra), (&b, &body_b, &rb)] {
        let again = into_resp(post(client, &k, body).await.unwrap()).await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again.body, first.body);
        assert_eq!(again.headers["idempotent-replayed"], "true");
    }
    // A's body under B's key is a misuse within B's scope, not A's answer.
    let misuse = into_resp(post(&b, &k, &body_a).await.unwrap()).await;
    assert_eq!(
        misuse.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        misuse.body
    );

    // The same body: B's request is B's own (here it meets A's user's
    // email, so a 409), never A's stored 201.
    let k = key();
    let body = user("same");
    let ra = into_resp(post(&a, &k, &body).await.unwrap()).await;
    let rb = into_resp(post(&b, &k, &body).await.unwrap()).await;
    assert_eq!(ra.status, StatusCode::CREATED);
    assert_eq!(rb.status, StatusCode::CONFLICT, "{:?}", rb.body);
    assert!(rb.headers.get("idempotent-replayed").is_none());

    let scopes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT client, count(*) FROM idempotency_keys GROUP BY client ORDER BY client",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        scopes,
        vec![("client-a".to_owned(), 2), ("client-b".to_owned(), 1)]
    );
    s.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn the_same_key_sent_at_once_by_one_client_has_one_effect_beside_another_client(
    pool: PgPool,
) {
    let s = Server::start(pool.clone()).await;
    let a = crate::support::authenticated(&issue_key(&pool, "client-a", &[Scope::All]).await);
    let b = crate::support::authenticated(&issue_key(&pool, "client-b", &[Scope::All]).await);
    let k = key();
    let body = json!({"name": "Jung", "email": format!("jung-{}@example.com", uuid::Uuid::new_v4().simple()), "phone": "010 7777 8888"});
    let body_b = json!({"name": "Jung", "email": format!("jung-b-{}@example.com", uuid::Uuid::new_v4().simple()), "phone": "010 7777 8888"});
    let sends = (0..50).map(|i| {
        let (client, body) = if i % 2 == 0 {
            (&a, &body)
        } else {
            (&b, &body_b)
        };
        client
            .post(format!("{}/v1/users", s.base))
            .header("idempotency-key", &k)
            .json(body)
            .send()
    });
    let answers = futures::future::join_all(sends).await;
    assert!(answers.iter().all(|r| r.as_ref().unwrap().status() == 201));
    assert_eq!(s.count("users").await, 2, "one per client");
    s.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_rotated_client_works_with_both_keys_until_the_old_one_is_revoked(pool: PgPool) {
    let s = Server::start_with(
        pool.clone(),
        entrip_common::config::IngestSettings {
            auth_cache_secs: 0,
            ..settings()
        },
    )
    .await;
    let name = ClientName::parse("booking-frontend").unwrap();
    let old = clients::create(&pool, &name, &[Scope::Read], None)
        .await
        .unwrap();
    let (new, still_working) = clients::rotate(&pool, &name).await.unwrap();
    assert_eq!(still_working, vec![old.prefix().to_owned()]);
    assert_ne!(old, new);
    let path = "/v1/users/00000000-0000-0000-0000-000000000000";
    for k in [&old, &new] {
        let r = call(&s, Some(&bearer(&k.reveal())), Method::GET, path, None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "let in: {:?}", r.body);
    }
    assert_eq!(
        clients::revoke(&pool, &name, Some(old.prefix()))
            .await
            .unwrap(),
        1
    );
    let r = call(&s, Some(&bearer(&old.reveal())), Method::GET, path, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&s, Some(&bearer(&new.reveal())), Method::GET, path, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The rotated key keeps the client's scopes: still read-only.
    let r = call(
        &s,
        Some(&bearer(&new.reveal())),
        Method::POST,
        "/v1/users",
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Names are never reused, and a client with no working key cannot rotate.
    clients::revoke(&pool, &name, None).await.unwrap();
    assert!(matches!(
        clients::create(&pool, &name, &[Scope::Read], None).await,
        Err(clients::ClientError::NameTaken(_))
    ));
    assert!(matches!(
        clients::rotate(&pool, &name).await,
        Err(clients::ClientError::Revoked(_))
    ));
    s.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_revocation_takes_effect_within_the_cache_time(pool: PgPool) {
    let cache = Duration::from_secs(1);
    let s = Server::start_with(
        pool.clone(),
        entrip_common::config::IngestSettings {
            auth_cache_secs: cache.as_secs(),
            ..settings()
        },
    )
    .await;
    let name = ClientName::parse("dashboard").unwrap();
    let k = clients::create(&pool, &name, &[Scope::Read], None)
        .await
        .unwrap()
        .reveal();
    let path = "/v1/users/00000000-0000-0000-0000-000000000000";
    let r = call(&s, Some(&bearer(&k)), Method::GET, path, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "cached now");
    clients::revoke(&pool, &name, None).await.unwrap();
    let revoked_at = Instant::now();
    loop {
        let r = call(&s, Some(&bearer(&k)), Method::GET, path, None).await;
        if r.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        // Each request takes well under the cache time; a refusal later
        // than cache + 1 s would be a cache that does not expire.
        assert!(
            revoked_at.elapsed() < cache + Duration::from_secs(1),
            "still let in {:?} after the revocation",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn the_table_holds_nothing_that_authenticates(pool: PgPool) {
    let s = Server::start(pool.clone()).await;
    let name = ClientName::parse("gateway").unwrap();
    let k = clients::create(&pool, &name, &[Scope::All], None)
        .await
        .unwrap();
    let full = k.reveal();
    let secret = full.rsplit('_').next().unwrap().to_owned();
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM api_clients c
          WHERE to_jsonb(c)::text LIKE '%' || $1 || '%'
             OR encode(c.secret_sha256, 'hex') = $1",
    )
    .bind(&secret)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0, "the secret is stored only hashed");
    let (prefix, hash): (String, Vec<u8>) =
        sqlx::query_as("SELECT key_prefix, secret_sha256 FROM api_clients WHERE name = 'gateway'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(prefix, k.prefix());
    // What a reader of the table could try: the stored hash as the secret.
    let from_row = format!("entrip_{prefix}_{}", hex::encode(&hash));
    let path = "/v1/users/00000000-0000-0000-0000-000000000000";
    let r = call(&s, Some(&bearer(&from_row)), Method::GET, path, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&s, Some(&bearer(&full)), Method::GET, path, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "the real key works");
    s.stop().await;
}
