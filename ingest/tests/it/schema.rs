//! The schema itself refuses data that breaks the contract, whatever code
//! writes it: rows are inserted with plain SQL into a test database and each
//! violated constraint is checked by its SQLSTATE (23502 not-null, 23514
//! check, 23505 unique, 23503 foreign key): NOT NULL columns, positive
//! amounts, taxes within amounts, arrival after departure, currency format,
//! status vocabularies, booking codes, case-insensitive e-mail uniqueness,
//! one settlement per booking with net = gross - tax, idempotency keys,
//! inbox and delivery deduplication, outbox topics and final states,
//! approval steps, foreign keys with `ON DELETE RESTRICT`, one live payment
//! per booking, column types, and `updated_at` kept by the database.

use sqlx::{AssertSqlSafe, PgPool, Row};
use uuid::Uuid;

const NOT_NULL: &str = "23502";
const CHECK: &str = "23514";
const UNIQUE: &str = "23505";
const FOREIGN_KEY: &str = "23503";

/// Rows every test can refer to: a user, a PENDING booking that requires
/// approval, its APPROVED payment and its APPROVED approval (no settlement).
struct Fixture {
    user: Uuid,
    booking: Uuid,
    payment: Uuid,
    approval: Uuid,
}

async fn fixture(pool: &PgPool) -> Fixture {
    let f = Fixture {
        user: Uuid::new_v4(),
        booking: Uuid::new_v4(),
        payment: Uuid::new_v4(),
        approval: Uuid::new_v4(),
    };
    let u = f.user;
    let b = f.booking;
    exec_ok(
        pool,
        "user",
        insert("users", &with(&users(), &[("id", &lit(u))])),
    )
    .await;
    exec_ok(
        pool,
        "booking",
        insert(
            "bookings",
            &with(
                &bookings(&f),
                &[("id", &lit(b)), ("requires_approval", "true")],
            ),
        ),
    )
    .await;
    exec_ok(
        pool,
        "payment",
        insert(
            "payments",
            &with(
                &payments(&f),
                &[
                    ("id", &lit(f.payment)),
                    ("status", "'APPROVED'"),
                    ("approval_id", "'PG-0001'"),
                    ("failure_reason", "NULL"),
                ],
            ),
        ),
    )
    .await;
    exec_ok(
        pool,
        "approval",
        insert(
            "approvals",
            &with(
                &approvals(&f),
                &[
                    ("id", &lit(f.approval)),
                    ("status", "'APPROVED'"),
                    ("current_step", "2"),
                ],
            ),
        ),
    )
    .await;
    f
}

/// A UUID as an SQL literal.
fn lit(id: Uuid) -> String {
    format!("'{id}'::uuid")
}

type Cols = Vec<(&'static str, String)>;

fn cols(pairs: &[(&'static str, &str)]) -> Cols {
    pairs.iter().map(|(c, v)| (*c, (*v).to_owned())).collect()
}

/// `base` with some columns replaced (or added).
fn with(base: &Cols, overrides: &[(&'static str, &str)]) -> Cols {
    let mut out = base.clone();
    for (col, value) in overrides {
        match out.iter_mut().find(|(c, _)| c == col) {
            Some(slot) => slot.1 = (*value).to_owned(),
            None => out.push((col, (*value).to_owned())),
        }
    }
    out
}

fn insert(table: &str, cols: &Cols) -> String {
    let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
    let values: Vec<&str> = cols.iter().map(|(_, v)| v.as_str()).collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        names.join(", "),
        values.join(", ")
    )
}

// Valid rows, column by column, as SQL expressions (unique values are
// generated so that a template can be inserted more than once).

fn users() -> Cols {
    cols(&[
        ("id", "gen_random_uuid()"),
        ("name", "'Kim Minji'"),
        ("email", "'kim-' || gen_random_uuid() || '@example.com'"),
        ("phone", "'+82 10 1234 5678'"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
    ])
}

fn bookings(f: &Fixture) -> Cols {
    let mut c = cols(&[
        ("id", "gen_random_uuid()"),
        ("code", "'BK-' || upper(substr(md5(random()::text), 1, 12))"),
        ("customer_name", "'Kim Minji'"),
        ("customer_phone", "'010-1234-5678'"),
        ("itinerary_from", "'ICN'"),
        ("itinerary_to", "'NRT'"),
        ("depart_at", "'2026-12-24T00:30:00Z'"),
        ("arrive_at", "'2026-12-24T02:45:00Z'"),
        ("currency", "'KRW'"),
        ("amount", "350000"),
        ("requires_approval", "false"),
        ("status", "'PENDING'"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
    ]);
    c.push(("user_id", lit(f.user)));
    c
}

/// A FAILED payment, so that the template never collides with the live one.
fn payments(f: &Fixture) -> Cols {
    let mut c = cols(&[
        ("id", "gen_random_uuid()"),
        ("method", "'CARD'"),
        ("amount", "350000"),
        ("tax", "31818"),
        ("currency", "'KRW'"),
        ("status", "'FAILED'"),
        ("failure_reason", "'declined'"),
        ("decided_at", "now()"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
    ]);
    c.push(("booking_id", lit(f.booking)));
    c
}

/// A REJECTED approval, so that the template never collides with the live one.
fn approvals(f: &Fixture) -> Cols {
    let mut c = cols(&[
        ("id", "gen_random_uuid()"),
        ("title", "'Business trip'"),
        ("reason", "'Customer meeting'"),
        ("steps", "2"),
        ("current_step", "1"),
        ("status", "'REJECTED'"),
        ("decided_at", "now()"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
    ]);
    c.push(("booking_id", lit(f.booking)));
    c.push(("requester_id", lit(f.user)));
    c
}

fn approval_decisions(f: &Fixture) -> Cols {
    let mut c = cols(&[
        ("step", "1"),
        ("decision", "'APPROVED'"),
        ("reason", "'fine'"),
        ("decided_at", "now()"),
    ]);
    c.push(("approval_id", lit(f.approval)));
    c.push(("approver_id", lit(f.user)));
    c
}

fn settlements(f: &Fixture) -> Cols {
    let mut c = cols(&[
        ("id", "gen_random_uuid()"),
        ("gross", "350000"),
        ("tax", "31818"),
        ("net", "318182"),
        ("currency", "'KRW'"),
        ("settled_at", "now()"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
    ]);
    c.push(("booking_id", lit(f.booking)));
    c.push(("payment_id", lit(f.payment)));
    c.push(("approval_id", lit(f.approval)));
    c
}

fn audit_log() -> Cols {
    cols(&[
        ("occurred_at", "now()"),
        ("actor", "'http:upstream'"),
        ("action", "'booking.create'"),
        ("entity_type", "'booking'"),
        ("entity_id", "gen_random_uuid()"),
        ("detail", "'{}'::jsonb"),
    ])
}

fn outbox() -> Cols {
    cols(&[
        ("id", "gen_random_uuid()"),
        ("aggregate_type", "'booking'"),
        ("aggregate_id", "gen_random_uuid()"),
        ("topic", "'booking.created'"),
        ("payload", "'{}'::jsonb"),
        ("headers", "'{}'::jsonb"),
        ("created_at", "now()"),
        ("attempts", "0"),
        ("next_attempt_at", "now()"),
    ])
}

fn idempotency_keys() -> Cols {
    cols(&[
        ("client", "'booking-frontend'"),
        ("key", "'key-' || md5(random()::text)"),
        ("method", "'POST'"),
        ("path", "'/v1/users'"),
        ("request_hash", "sha256('body'::bytea)"),
        ("created_at", "now()"),
        ("expires_at", "now() + interval '1 day'"),
    ])
}

fn api_clients() -> Cols {
    cols(&[
        ("id", "gen_random_uuid()"),
        ("name", "'booking-frontend'"),
        ("scopes", "ARRAY['bookings:write', 'read']"),
        ("key_prefix", "substr(md5(random()::text), 1, 12)"),
        ("secret_sha256", "sha256(random()::text::bytea)"),
        ("created_at", "now()"),
    ])
}

fn inbox() -> Cols {
    cols(&[
        ("consumer", "'settlement'"),
        ("message_id", "gen_random_uuid()::text"),
        ("processed_at", "now()"),
    ])
}

fn notification_deliveries() -> Cols {
    cols(&[
        ("id", "gen_random_uuid()"),
        ("event_id", "gen_random_uuid()"),
        ("subscriber", "'http://127.0.0.1:9999/hooks'"),
        ("topic", "'booking.created'"),
        ("status", "'PENDING'"),
        ("attempts", "0"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
    ])
}

async fn exec(pool: &PgPool, sql: &str) -> Result<u64, sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

/// Runs `sql`, which must succeed.
async fn exec_ok(pool: &PgPool, case: &str, sql: String) -> u64 {
    match exec(pool, &sql).await {
        Ok(n) => n,
        Err(err) => panic!("{case}: expected success, got {err}\n  SQL: {sql}"),
    }
}

/// Runs `sql`, which the schema must refuse with SQLSTATE `code`.
async fn refused(pool: &PgPool, case: &str, sql: String, code: &str) {
    match exec(pool, &sql).await {
        Ok(_) => panic!("{case}: the schema accepted it (expected SQLSTATE {code})\n  SQL: {sql}"),
        Err(err) => {
            let db = err
                .as_database_error()
                .unwrap_or_else(|| panic!("{case}: not a database error: {err}"));
            assert_eq!(
                db.code().as_deref(),
                Some(code),
                "{case}: wrong SQLSTATE ({}; constraint {:?})\n  SQL: {sql}",
                db.message(),
                db.constraint()
            );
        }
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn not_null_columns_refuse_null(pool: PgPool) {
    let f = fixture(&pool).await;
    let tables: Vec<(&str, Cols, &[&'static str])> = vec![
        (
            "users",
            users(),
            &["id", "name", "email", "phone", "created_at", "updated_at"],
        ),
        (
            "bookings",
            bookings(&f),
            &[
                "id",
                "code",
                "user_id",
                "customer_name",
                "customer_phone",
                "itinerary_from",
                "itinerary_to",
                "depart_at",
                "arrive_at",
                "currency",
                "amount",
                "requires_approval",
                "status",
                "created_at",
                "updated_at",
            ],
        ),
        (
            "payments",
            payments(&f),
            &[
                "id",
                "booking_id",
                "method",
                "amount",
                "tax",
                "currency",
                "status",
                "created_at",
                "updated_at",
            ],
        ),
        (
            "approvals",
            approvals(&f),
            &[
                "id",
                "booking_id",
                "requester_id",
                "title",
                "reason",
                "steps",
                "current_step",
                "status",
                "created_at",
                "updated_at",
            ],
        ),
        (
            "approval_decisions",
            approval_decisions(&f),
            &[
                "approval_id",
                "step",
                "approver_id",
                "decision",
                "decided_at",
            ],
        ),
        (
            "settlements",
            settlements(&f),
            &[
                "id",
                "booking_id",
                "payment_id",
                "gross",
                "tax",
                "net",
                "currency",
                "settled_at",
                "created_at",
                "updated_at",
            ],
        ),
        (
            "audit_log",
            audit_log(),
            &[
                "occurred_at",
                "actor",
                "action",
                "entity_type",
                "entity_id",
                "detail",
            ],
        ),
        (
            "outbox",
            outbox(),
            &[
                "id",
                "aggregate_type",
                "aggregate_id",
                "topic",
                "payload",
                "headers",
                "created_at",
                "attempts",
                "next_attempt_at",
            ],
        ),
        (
            "idempotency_keys",
            idempotency_keys(),
            &[
                "client",
                "key",
                "method",
                "path",
                "request_hash",
                "created_at",
                "expires_at",
            ],
        ),
        (
            "inbox",
            inbox(),
            &["consumer", "message_id", "processed_at"],
        ),
        (
            "api_clients",
            api_clients(),
            &[
                "id",
                "name",
                "scopes",
                "key_prefix",
                "secret_sha256",
                "created_at",
            ],
        ),
        (
            "notification_deliveries",
            notification_deliveries(),
            &[
                "id",
                "event_id",
                "subscriber",
                "topic",
                "status",
                "attempts",
                "created_at",
                "updated_at",
            ],
        ),
    ];
    for (table, template, not_null) in &tables {
        for col in *not_null {
            let sql = insert(table, &with(template, &[(*col, "NULL")]));
            refused(&pool, &format!("{table}.{col} NULL"), sql, NOT_NULL).await;
        }
        // The template itself is valid, so each refusal above is the column's.
        let n = exec_ok(&pool, &format!("{table} template"), insert(table, template)).await;
        assert_eq!(n, 1, "{table} template inserted");
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn amounts_must_be_positive_and_taxes_within_them(pool: PgPool) {
    let f = fixture(&pool).await;
    let b = bookings(&f);
    let p = payments(&f);
    let s = settlements(&f);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "booking amount 0",
            insert("bookings", &with(&b, &[("amount", "0")])),
            CHECK,
        ),
        (
            "booking amount -1",
            insert("bookings", &with(&b, &[("amount", "-1")])),
            CHECK,
        ),
        (
            "booking amount -0.01",
            insert("bookings", &with(&b, &[("amount", "-0.01")])),
            CHECK,
        ),
        (
            "booking amount beyond numeric(18,2)",
            insert("bookings", &with(&b, &[("amount", "10000000000000000")])),
            "22003",
        ),
        (
            "payment amount 0",
            insert("payments", &with(&p, &[("amount", "0"), ("tax", "0")])),
            CHECK,
        ),
        (
            "payment amount -5",
            insert("payments", &with(&p, &[("amount", "-5"), ("tax", "0")])),
            CHECK,
        ),
        (
            "payment tax -1",
            insert("payments", &with(&p, &[("tax", "-1")])),
            CHECK,
        ),
        (
            "payment tax above amount",
            insert("payments", &with(&p, &[("tax", "350001")])),
            CHECK,
        ),
        (
            "settlement gross 0",
            insert(
                "settlements",
                &with(&s, &[("gross", "0"), ("tax", "0"), ("net", "0")]),
            ),
            CHECK,
        ),
        (
            "settlement gross -1",
            insert(
                "settlements",
                &with(&s, &[("gross", "-1"), ("tax", "0"), ("net", "-1")]),
            ),
            CHECK,
        ),
        (
            "settlement tax -1",
            insert(
                "settlements",
                &with(&s, &[("tax", "-1"), ("net", "350001")]),
            ),
            CHECK,
        ),
        (
            "settlement tax above gross (net negative)",
            insert(
                "settlements",
                &with(&s, &[("tax", "350001"), ("net", "-1")]),
            ),
            CHECK,
        ),
    ];
    for (case, sql, code) in cases {
        refused(&pool, case, sql, code).await;
    }
    // The limits: a tax of 0 and a tax equal to the amount.
    exec_ok(
        &pool,
        "payment tax 0",
        insert("payments", &with(&p, &[("tax", "0")])),
    )
    .await;
    exec_ok(
        &pool,
        "payment tax = amount",
        insert("payments", &with(&p, &[("tax", "350000")])),
    )
    .await;
    exec_ok(
        &pool,
        "booking amount 0.01",
        insert("bookings", &with(&b, &[("amount", "0.01")])),
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn times_currencies_and_vocabularies_are_checked(pool: PgPool) {
    let f = fixture(&pool).await;
    let b = bookings(&f);
    let p = payments(&f);
    let a = approvals(&f);
    let s = settlements(&f);
    let n = notification_deliveries();
    let mut cases: Vec<(String, String)> = vec![
        (
            "arrive_at = depart_at".into(),
            insert(
                "bookings",
                &with(&b, &[("arrive_at", "'2026-12-24T00:30:00Z'")]),
            ),
        ),
        (
            "arrive_at before depart_at".into(),
            insert(
                "bookings",
                &with(&b, &[("arrive_at", "'2026-12-24T00:29:59Z'")]),
            ),
        ),
        (
            "arrive_at = depart_at in another offset".into(),
            insert(
                "bookings",
                &with(&b, &[("arrive_at", "'2026-12-24T09:30:00+09:00'")]),
            ),
        ),
        (
            "booking status DONE".into(),
            insert("bookings", &with(&b, &[("status", "'DONE'")])),
        ),
        (
            "booking status pending".into(),
            insert("bookings", &with(&b, &[("status", "'pending'")])),
        ),
        (
            "booking status empty".into(),
            insert("bookings", &with(&b, &[("status", "''")])),
        ),
        (
            "payment status REFUNDED".into(),
            insert("payments", &with(&p, &[("status", "'REFUNDED'")])),
        ),
        (
            "payment status failed".into(),
            insert("payments", &with(&p, &[("status", "'failed'")])),
        ),
        (
            "payment method CASH".into(),
            insert("payments", &with(&p, &[("method", "'CASH'")])),
        ),
        (
            "approval status CANCELED".into(),
            insert("approvals", &with(&a, &[("status", "'CANCELED'")])),
        ),
        (
            "approval status rejected".into(),
            insert("approvals", &with(&a, &[("status", "'rejected'")])),
        ),
        (
            "delivery status SENT".into(),
            insert(
                "notification_deliveries",
                &with(&n, &[("status", "'SENT'")]),
            ),
        ),
        (
            "delivery status delivered".into(),
            insert(
                "notification_deliveries",
                &with(&n, &[("status", "'delivered'")]),
            ),
        ),
        (
            "decision MAYBE".into(),
            insert(
                "approval_decisions",
                &with(&approval_decisions(&f), &[("decision", "'MAYBE'")]),
            ),
        ),
        (
            "audit entity_type order".into(),
            insert(
                "audit_log",
                &with(&audit_log(), &[("entity_type", "'order'")]),
            ),
        ),
        (
            "outbox aggregate_type order".into(),
            insert("outbox", &with(&outbox(), &[("aggregate_type", "'order'")])),
        ),
        (
            "user phone with letters".into(),
            insert("users", &with(&users(), &[("phone", "'010-CALL-ME'")])),
        ),
        (
            "user phone of 6".into(),
            insert("users", &with(&users(), &[("phone", "'123456'")])),
        ),
        (
            "user email without @".into(),
            insert("users", &with(&users(), &[("email", "'kim.example.com'")])),
        ),
        (
            "user name untrimmed".into(),
            insert("users", &with(&users(), &[("name", "' Kim '")])),
        ),
        (
            "user name empty".into(),
            insert("users", &with(&users(), &[("name", "''")])),
        ),
        (
            "user name of 101".into(),
            insert("users", &with(&users(), &[("name", "repeat('n', 101)")])),
        ),
        (
            "booking customer_name empty".into(),
            insert("bookings", &with(&b, &[("customer_name", "''")])),
        ),
        (
            "booking itinerary_to untrimmed".into(),
            insert("bookings", &with(&b, &[("itinerary_to", "'NRT '")])),
        ),
    ];
    for bad in ["krw", "KR", "KRWW", "123", "", "K1W"] {
        let v = format!("'{bad}'");
        cases.push((
            format!("booking currency {bad:?}"),
            insert("bookings", &with(&b, &[("currency", &v)])),
        ));
        cases.push((
            format!("payment currency {bad:?}"),
            insert("payments", &with(&p, &[("currency", &v)])),
        ));
        cases.push((
            format!("settlement currency {bad:?}"),
            insert("settlements", &with(&s, &[("currency", &v)])),
        ));
    }
    for (case, sql) in cases {
        refused(&pool, &case, sql, CHECK).await;
    }
    // Every value of each vocabulary is accepted.
    for method in [
        "CARD",
        "BANK_TRANSFER",
        "VIRTUAL_ACCOUNT",
        "MOBILE",
        "POINTS",
    ] {
        let v = format!("'{method}'");
        exec_ok(
            &pool,
            &format!("method {method}"),
            insert("payments", &with(&p, &[("method", &v)])),
        )
        .await;
    }
    for status in ["PENDING", "DELIVERED", "DEAD"] {
        let v = format!("'{status}'");
        let delivered = if status == "DELIVERED" {
            "now()"
        } else {
            "NULL"
        };
        exec_ok(
            &pool,
            &format!("delivery status {status}"),
            insert(
                "notification_deliveries",
                &with(&n, &[("status", &v), ("delivered_at", delivered)]),
            ),
        )
        .await;
    }
    exec_ok(
        &pool,
        "booking CANCELED",
        insert(
            "bookings",
            &with(&b, &[("status", "'CANCELED'"), ("canceled_at", "now()")]),
        ),
    )
    .await;
    exec_ok(
        &pool,
        "booking CONFIRMED",
        insert(
            "bookings",
            &with(&b, &[("status", "'CONFIRMED'"), ("confirmed_at", "now()")]),
        ),
    )
    .await;
    exec_ok(
        &pool,
        "booking in USD",
        insert(
            "bookings",
            &with(&b, &[("currency", "'USD'"), ("amount", "129.90")]),
        ),
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn state_times_match_the_status(pool: PgPool) {
    let f = fixture(&pool).await;
    let b = bookings(&f);
    let p = payments(&f);
    let a = approvals(&f);
    let n = notification_deliveries();
    let cases: Vec<(&str, String)> = vec![
        (
            "CANCELED booking without canceled_at",
            insert("bookings", &with(&b, &[("status", "'CANCELED'")])),
        ),
        (
            "PENDING booking with canceled_at",
            insert("bookings", &with(&b, &[("canceled_at", "now()")])),
        ),
        (
            "CONFIRMED booking without confirmed_at",
            insert("bookings", &with(&b, &[("status", "'CONFIRMED'")])),
        ),
        (
            "APPROVED payment without approval_id",
            insert(
                "payments",
                &with(&p, &[("status", "'APPROVED'"), ("failure_reason", "NULL")]),
            ),
        ),
        (
            "FAILED payment without decided_at",
            insert("payments", &with(&p, &[("decided_at", "NULL")])),
        ),
        (
            "PENDING payment with decided_at",
            insert("payments", &with(&p, &[("status", "'PENDING'")])),
        ),
        (
            "REJECTED approval without decided_at",
            insert("approvals", &with(&a, &[("decided_at", "NULL")])),
        ),
        (
            "PENDING approval with decided_at",
            insert("approvals", &with(&a, &[("status", "'PENDING'")])),
        ),
        (
            "DELIVERED delivery without delivered_at",
            insert(
                "notification_deliveries",
                &with(&n, &[("status", "'DELIVERED'")]),
            ),
        ),
        (
            "PENDING delivery with delivered_at",
            insert(
                "notification_deliveries",
                &with(&n, &[("delivered_at", "now()")]),
            ),
        ),
    ];
    for (case, sql) in cases {
        refused(&pool, case, sql, CHECK).await;
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn booking_codes_are_formatted_and_unique(pool: PgPool) {
    let f = fixture(&pool).await;
    let b = bookings(&f);
    for (case, code) in [
        ("lowercase", "'abc-123'".to_owned()),
        ("5 characters", "'ABCDE'".to_owned()),
        ("33 characters", format!("'{}'", "A".repeat(33))),
        ("underscore", "'ABC_123'".to_owned()),
        ("space", "'ABC 123'".to_owned()),
        ("empty", "''".to_owned()),
        ("newline at the end", "E'ABC-123\\n'".to_owned()),
    ] {
        refused(
            &pool,
            &format!("code {case}"),
            insert("bookings", &with(&b, &[("code", &code)])),
            CHECK,
        )
        .await;
    }
    exec_ok(
        &pool,
        "code of 6",
        insert("bookings", &with(&b, &[("code", "'ABC-12'")])),
    )
    .await;
    let max = format!("'{}'", "Z".repeat(32));
    exec_ok(
        &pool,
        "code of 32",
        insert("bookings", &with(&b, &[("code", &max)])),
    )
    .await;
    refused(
        &pool,
        "duplicate code",
        insert("bookings", &with(&b, &[("code", "'ABC-12'")])),
        UNIQUE,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn user_emails_are_unique_ignoring_case(pool: PgPool) {
    let u = users();
    exec_ok(
        &pool,
        "first user",
        insert("users", &with(&u, &[("email", "'kim@example.com'")])),
    )
    .await;
    for email in ["kim@example.com", "Kim@Example.com", "KIM@EXAMPLE.COM"] {
        let v = format!("'{email}'");
        refused(
            &pool,
            &format!("second user {email}"),
            insert("users", &with(&u, &[("email", &v)])),
            UNIQUE,
        )
        .await;
    }
    exec_ok(
        &pool,
        "another email",
        insert("users", &with(&u, &[("email", "'kim2@example.com'")])),
    )
    .await;
    // An update into a taken address is refused too.
    refused(
        &pool,
        "update into a taken email",
        "UPDATE users SET email = 'KIM@example.com' WHERE email = 'kim2@example.com'".into(),
        UNIQUE,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn one_settlement_per_booking_with_net_gross_minus_tax(pool: PgPool) {
    let f = fixture(&pool).await;
    let s = settlements(&f);
    refused(
        &pool,
        "net above gross - tax",
        insert("settlements", &with(&s, &[("net", "318183")])),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "net below gross - tax",
        insert("settlements", &with(&s, &[("net", "318181")])),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "net = gross with a tax",
        insert("settlements", &with(&s, &[("net", "350000")])),
        CHECK,
    )
    .await;
    exec_ok(&pool, "the settlement", insert("settlements", &s)).await;

    // A second settlement of the booking, even for another payment.
    let failed = Uuid::new_v4();
    exec_ok(
        &pool,
        "a failed payment of the booking",
        insert("payments", &with(&payments(&f), &[("id", &lit(failed))])),
    )
    .await;
    refused(
        &pool,
        "second settlement of the booking",
        insert("settlements", &with(&s, &[("payment_id", &lit(failed))])),
        UNIQUE,
    )
    .await;
    // And a payment is settled once.
    let other = Uuid::new_v4();
    exec_ok(
        &pool,
        "another booking",
        insert("bookings", &with(&bookings(&f), &[("id", &lit(other))])),
    )
    .await;
    refused(
        &pool,
        "second settlement of the payment",
        insert("settlements", &with(&s, &[("booking_id", &lit(other))])),
        UNIQUE,
    )
    .await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM settlements WHERE booking_id = $1")
        .bind(f.booking)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn idempotency_keys_are_unique_and_formatted(pool: PgPool) {
    let k = idempotency_keys();
    let visible: String = (b'!'..=b'~')
        .map(char::from)
        .collect::<String>()
        .replace('\'', "''");
    let k16 = format!("'{}'", "k".repeat(16));
    let k255 = format!("'{}'", "k".repeat(255));
    exec_ok(
        &pool,
        "key of 16",
        insert("idempotency_keys", &with(&k, &[("key", &k16)])),
    )
    .await;
    exec_ok(
        &pool,
        "key of 255",
        insert("idempotency_keys", &with(&k, &[("key", &k255)])),
    )
    .await;
    exec_ok(
        &pool,
        "every visible ASCII character",
        insert(
            "idempotency_keys",
            &with(&k, &[("key", &format!("'{visible}'"))]),
        ),
    )
    .await;
    refused(
        &pool,
        "duplicate key",
        insert("idempotency_keys", &with(&k, &[("key", &k16)])),
        UNIQUE,
    )
    .await;
    for (case, key) in [
        ("15 characters", format!("'{}'", "k".repeat(15))),
        ("256 characters", format!("'{}'", "k".repeat(256))),
        ("empty", "''".to_owned()),
        ("a space", "'0123456789 abcdef'".to_owned()),
        ("a tab", "E'0123456789\\tabcdef'".to_owned()),
        ("a non-ASCII letter", "'0123456789abcdéf'".to_owned()),
        ("a DEL", "E'0123456789abcdef\\x7f'".to_owned()),
    ] {
        refused(
            &pool,
            &format!("key with {case}"),
            insert("idempotency_keys", &with(&k, &[("key", &key)])),
            CHECK,
        )
        .await;
    }
    refused(
        &pool,
        "a request hash that is not SHA-256",
        insert(
            "idempotency_keys",
            &with(&k, &[("request_hash", "'\\x00'::bytea")]),
        ),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "expiry before creation",
        insert(
            "idempotency_keys",
            &with(&k, &[("expires_at", "now() - interval '1 second'")]),
        ),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "a response status without a body",
        insert("idempotency_keys", &with(&k, &[("response_status", "201")])),
        CHECK,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn idempotency_keys_are_unique_within_a_client_only(pool: PgPool) {
    let k = with(&idempotency_keys(), &[("key", "'shared-key-0123456789'")]);
    exec_ok(&pool, "client a", insert("idempotency_keys", &k)).await;
    exec_ok(
        &pool,
        "the same key, client b",
        insert(
            "idempotency_keys",
            &with(&k, &[("client", "'payment-gateway'")]),
        ),
    )
    .await;
    refused(
        &pool,
        "client a again",
        insert("idempotency_keys", &k),
        UNIQUE,
    )
    .await;
    refused(
        &pool,
        "an empty client",
        insert("idempotency_keys", &with(&k, &[("client", "''")])),
        CHECK,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn api_clients_hold_only_well_formed_hashed_keys(pool: PgPool) {
    let c = api_clients();
    let once = with(&c, &[("key_prefix", "'0123456789ab'")]);
    exec_ok(&pool, "a key", insert("api_clients", &once)).await;
    refused(
        &pool,
        "a second key with the same prefix",
        insert("api_clients", &with(&once, &[("id", "gen_random_uuid()")])),
        UNIQUE,
    )
    .await;
    exec_ok(
        &pool,
        "a second key of the same client (rotation)",
        insert("api_clients", &c),
    )
    .await;
    for (case, column, value) in [
        ("an unknown scope", "scopes", "ARRAY['bookings:read']"),
        ("no scope", "scopes", "ARRAY[]::text[]"),
        ("an upper-case name", "name", "'Booking'"),
        ("a name with a space", "name", "'a b'"),
        ("an empty name", "name", "''"),
        (
            "a prefix that is not 12 hex digits",
            "key_prefix",
            "'0123456789AB'",
        ),
        ("a short prefix", "key_prefix", "'0123'"),
        (
            "a hash that is not SHA-256",
            "secret_sha256",
            "'\\x00'::bytea",
        ),
        ("an empty broker user", "amqp_user", "''"),
        (
            "revoked before created",
            "revoked_at",
            "now() - interval '1 day'",
        ),
    ] {
        refused(
            &pool,
            case,
            insert("api_clients", &with(&c, &[(column, value)])),
            CHECK,
        )
        .await;
    }
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn inbox_and_deliveries_are_deduplicated(pool: PgPool) {
    let i = inbox();
    let once = with(&i, &[("message_id", "'msg-1'")]);
    exec_ok(&pool, "first inbox row", insert("inbox", &once)).await;
    refused(
        &pool,
        "same consumer and message",
        insert("inbox", &once),
        UNIQUE,
    )
    .await;
    exec_ok(
        &pool,
        "same message, another consumer",
        insert("inbox", &with(&once, &[("consumer", "'notifications'")])),
    )
    .await;
    refused(
        &pool,
        "empty consumer",
        insert("inbox", &with(&i, &[("consumer", "''")])),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "empty message id",
        insert("inbox", &with(&i, &[("message_id", "''")])),
        CHECK,
    )
    .await;

    let event = Uuid::new_v4();
    let d = with(&notification_deliveries(), &[("event_id", &lit(event))]);
    exec_ok(
        &pool,
        "first delivery",
        insert("notification_deliveries", &d),
    )
    .await;
    refused(
        &pool,
        "same event and subscriber",
        insert("notification_deliveries", &d),
        UNIQUE,
    )
    .await;
    exec_ok(
        &pool,
        "same event, another subscriber",
        insert(
            "notification_deliveries",
            &with(&d, &[("subscriber", "'http://127.0.0.1:9998/other'")]),
        ),
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn outbox_topics_and_final_states_are_checked(pool: PgPool) {
    let o = outbox();
    for topic in [
        "user.created",
        "booking.created",
        "booking.confirmed",
        "booking.canceled",
        "payment.requested",
        "payment.approved",
        "payment.failed",
        "approval.requested",
        "approval.decided",
        "settlement.recorded",
    ] {
        let v = format!("'{topic}'");
        exec_ok(
            &pool,
            &format!("topic {topic}"),
            insert("outbox", &with(&o, &[("topic", &v)])),
        )
        .await;
    }
    for topic in [
        "booking.deleted",
        "BOOKING.CREATED",
        "booking.*",
        "",
        "user.created ",
    ] {
        let v = format!("'{topic}'");
        refused(
            &pool,
            &format!("topic {topic:?}"),
            insert("outbox", &with(&o, &[("topic", &v)])),
            CHECK,
        )
        .await;
    }
    refused(
        &pool,
        "published and dead",
        insert(
            "outbox",
            &with(&o, &[("published_at", "now()"), ("dead_at", "now()")]),
        ),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "negative attempts",
        insert("outbox", &with(&o, &[("attempts", "-1")])),
        CHECK,
    )
    .await;
    exec_ok(
        &pool,
        "published",
        insert("outbox", &with(&o, &[("published_at", "now()")])),
    )
    .await;
    let dead = Uuid::new_v4();
    exec_ok(
        &pool,
        "dead",
        insert(
            "outbox",
            &with(&o, &[("id", &lit(dead)), ("dead_at", "now()")]),
        ),
    )
    .await;
    refused(
        &pool,
        "a dead row marked published",
        format!("UPDATE outbox SET published_at = now() WHERE id = '{dead}'"),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "duplicate event id",
        insert("outbox", &with(&o, &[("id", &lit(dead))])),
        UNIQUE,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn approval_steps_are_bounded(pool: PgPool) {
    let f = fixture(&pool).await;
    let a = approvals(&f);
    for (case, overrides) in [
        ("steps 0", vec![("steps", "0")]),
        ("steps 6", vec![("steps", "6")]),
        ("steps -1", vec![("steps", "-1")]),
        ("current_step 0", vec![("current_step", "0")]),
        (
            "current_step above steps",
            vec![("steps", "2"), ("current_step", "3")],
        ),
        (
            "current_step 6 of 5",
            vec![("steps", "5"), ("current_step", "6")],
        ),
    ] {
        refused(
            &pool,
            case,
            insert("approvals", &with(&a, &overrides)),
            CHECK,
        )
        .await;
    }
    for steps in 1..=5 {
        let v = steps.to_string();
        exec_ok(
            &pool,
            &format!("steps {steps} at its last step"),
            insert(
                "approvals",
                &with(&a, &[("steps", &v), ("current_step", &v)]),
            ),
        )
        .await;
    }
    let d = approval_decisions(&f);
    refused(
        &pool,
        "decision step 0",
        insert("approval_decisions", &with(&d, &[("step", "0")])),
        CHECK,
    )
    .await;
    refused(
        &pool,
        "decision step 6",
        insert("approval_decisions", &with(&d, &[("step", "6")])),
        CHECK,
    )
    .await;
    exec_ok(&pool, "a decision", insert("approval_decisions", &d)).await;
    let other = Uuid::new_v4();
    exec_ok(
        &pool,
        "another user",
        insert("users", &with(&users(), &[("id", &lit(other))])),
    )
    .await;
    refused(
        &pool,
        "a second decision of the step",
        insert(
            "approval_decisions",
            &with(&d, &[("approver_id", &lit(other))]),
        ),
        UNIQUE,
    )
    .await;
    refused(
        &pool,
        "a second decision by the approver",
        insert("approval_decisions", &with(&d, &[("step", "2")])),
        UNIQUE,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn foreign_keys_refuse_unknown_rows_and_restrict_deletes(pool: PgPool) {
    let f = fixture(&pool).await;
    let unknown = lit(Uuid::new_v4());
    let cases: Vec<(&str, String)> = vec![
        (
            "booking of an unknown user",
            insert("bookings", &with(&bookings(&f), &[("user_id", &unknown)])),
        ),
        (
            "payment of an unknown booking",
            insert(
                "payments",
                &with(&payments(&f), &[("booking_id", &unknown)]),
            ),
        ),
        (
            "approval of an unknown booking",
            insert(
                "approvals",
                &with(&approvals(&f), &[("booking_id", &unknown)]),
            ),
        ),
        (
            "approval by an unknown requester",
            insert(
                "approvals",
                &with(&approvals(&f), &[("requester_id", &unknown)]),
            ),
        ),
        (
            "decision of an unknown approval",
            insert(
                "approval_decisions",
                &with(&approval_decisions(&f), &[("approval_id", &unknown)]),
            ),
        ),
        (
            "decision by an unknown approver",
            insert(
                "approval_decisions",
                &with(&approval_decisions(&f), &[("approver_id", &unknown)]),
            ),
        ),
        (
            "settlement of an unknown booking",
            insert(
                "settlements",
                &with(&settlements(&f), &[("booking_id", &unknown)]),
            ),
        ),
        (
            "settlement of an unknown payment",
            insert(
                "settlements",
                &with(&settlements(&f), &[("payment_id", &unknown)]),
            ),
        ),
        (
            "settlement of an unknown approval",
            insert(
                "settlements",
                &with(&settlements(&f), &[("approval_id", &unknown)]),
            ),
        ),
        (
            "booking moved to an unknown user",
            format!(
                "UPDATE bookings SET user_id = {unknown} WHERE id = {}",
                lit(f.booking)
            ),
        ),
    ];
    for (case, sql) in cases {
        refused(&pool, case, sql, FOREIGN_KEY).await;
    }

    exec_ok(&pool, "settlement", insert("settlements", &settlements(&f))).await;
    exec_ok(
        &pool,
        "decision",
        insert("approval_decisions", &approval_decisions(&f)),
    )
    .await;
    let deletes: Vec<(&str, String)> = vec![
        (
            "delete a user with a booking",
            format!("DELETE FROM users WHERE id = {}", lit(f.user)),
        ),
        (
            "delete a booking with a payment",
            format!("DELETE FROM bookings WHERE id = {}", lit(f.booking)),
        ),
        (
            "delete a payment with a settlement",
            format!("DELETE FROM payments WHERE id = {}", lit(f.payment)),
        ),
        (
            "delete an approval with decisions",
            format!("DELETE FROM approvals WHERE id = {}", lit(f.approval)),
        ),
    ];
    for (case, sql) in deletes {
        refused(&pool, case, sql, FOREIGN_KEY).await;
    }
    // Only a user without history can be deleted.
    let lone = Uuid::new_v4();
    exec_ok(
        &pool,
        "a user without bookings",
        insert("users", &with(&users(), &[("id", &lit(lone))])),
    )
    .await;
    let n = exec_ok(
        &pool,
        "delete it",
        format!("DELETE FROM users WHERE id = {}", lit(lone)),
    )
    .await;
    assert_eq!(n, 1);

    // Every foreign key is ON DELETE RESTRICT (not CASCADE, SET NULL or NO ACTION).
    let loose: Vec<String> = sqlx::query_scalar(
        "SELECT conrelid::regclass::text || '.' || conname FROM pg_constraint \
         WHERE contype = 'f' AND connamespace = 'public'::regnamespace AND confdeltype <> 'r' \
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        loose.is_empty(),
        "foreign keys without ON DELETE RESTRICT: {loose:?}"
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn a_booking_has_at_most_one_live_payment(pool: PgPool) {
    let f = fixture(&pool).await;
    let p = payments(&f);
    let pending = with(
        &p,
        &[
            ("status", "'PENDING'"),
            ("decided_at", "NULL"),
            ("failure_reason", "NULL"),
        ],
    );
    // The fixture's booking has an APPROVED payment.
    refused(
        &pool,
        "PENDING next to APPROVED",
        insert("payments", &pending),
        UNIQUE,
    )
    .await;
    let approved = with(
        &p,
        &[
            ("status", "'APPROVED'"),
            ("approval_id", "'PG-2'"),
            ("failure_reason", "NULL"),
        ],
    );
    refused(
        &pool,
        "APPROVED next to APPROVED",
        insert("payments", &approved),
        UNIQUE,
    )
    .await;
    exec_ok(&pool, "FAILED next to APPROVED", insert("payments", &p)).await;
    exec_ok(&pool, "another FAILED", insert("payments", &p)).await;

    // A booking whose payment failed may get a new one, but only one.
    let b2 = Uuid::new_v4();
    exec_ok(
        &pool,
        "second booking",
        insert("bookings", &with(&bookings(&f), &[("id", &lit(b2))])),
    )
    .await;
    let p2 = with(&pending, &[("booking_id", &lit(b2))]);
    let first = Uuid::new_v4();
    exec_ok(
        &pool,
        "first PENDING",
        insert("payments", &with(&p2, &[("id", &lit(first))])),
    )
    .await;
    refused(&pool, "second PENDING", insert("payments", &p2), UNIQUE).await;
    exec_ok(
        &pool,
        "the first fails",
        format!(
            "UPDATE payments SET status = 'FAILED', decided_at = now() WHERE id = {}",
            lit(first)
        ),
    )
    .await;
    exec_ok(&pool, "a retry after the failure", insert("payments", &p2)).await;
    refused(
        &pool,
        "the failed one revived",
        format!(
            "UPDATE payments SET status = 'PENDING', decided_at = NULL WHERE id = {}",
            lit(first)
        ),
        UNIQUE,
    )
    .await;
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn money_and_time_columns_have_the_contract_types(pool: PgPool) {
    let rows = sqlx::query(
        "SELECT table_name::text, column_name::text, data_type::text, \
                numeric_precision::int, numeric_scale::int \
         FROM information_schema.columns WHERE table_schema = 'public' \
           AND table_name <> '_sqlx_migrations' \
           AND (column_name IN ('amount', 'tax', 'gross', 'net') OR column_name LIKE '%\\_at')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut money = 0;
    for row in &rows {
        let table: String = row.get(0);
        let column: String = row.get(1);
        let ty: String = row.get(2);
        if column.ends_with("_at") {
            assert_eq!(ty, "timestamp with time zone", "{table}.{column}");
        } else {
            money += 1;
            let precision: Option<i32> = row.get(3);
            let scale: Option<i32> = row.get(4);
            assert_eq!(
                (ty.as_str(), precision, scale),
                ("numeric", Some(18), Some(2)),
                "{table}.{column}"
            );
        }
    }
    assert_eq!(
        money, 6,
        "bookings.amount, payments.amount/tax, settlements.gross/tax/net"
    );
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn updated_at_is_kept_by_the_database(pool: PgPool) {
    let f = fixture(&pool).await;
    exec_ok(&pool, "settlement", insert("settlements", &settlements(&f))).await;
    let delivery = Uuid::new_v4();
    exec_ok(
        &pool,
        "delivery",
        insert(
            "notification_deliveries",
            &with(&notification_deliveries(), &[("id", &lit(delivery))]),
        ),
    )
    .await;
    let targets: Vec<(&str, Uuid, &str)> = vec![
        ("users", f.user, "name = 'Kim Jisoo'"),
        ("bookings", f.booking, "customer_name = 'Kim Jisoo'"),
        ("payments", f.payment, "approval_id = 'PG-0002'"),
        ("approvals", f.approval, "title = 'Another trip'"),
        ("settlements", f.booking, "currency = 'KRW'"),
        (
            "notification_deliveries",
            delivery,
            "attempts = attempts + 1",
        ),
    ];
    for (table, id, change) in targets {
        let key = if table == "settlements" {
            "booking_id"
        } else {
            "id"
        };
        exec_ok(
            &pool,
            &format!("{table}: age the row"),
            format!(
                "UPDATE {table} SET created_at = '2020-01-01T00:00:00Z', \
                 updated_at = '2020-01-01T00:00:00Z' WHERE {key} = {}",
                lit(id)
            ),
        )
        .await;
        // The trigger sets updated_at on every update, the one above too.
        let times = |pool: PgPool| async move {
            let sql = format!(
                "SELECT created_at, updated_at, now() FROM {table} WHERE {key} = {}",
                lit(id)
            );
            let row = sqlx::query(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            let created: chrono::DateTime<chrono::Utc> = row.get(0);
            let updated: chrono::DateTime<chrono::Utc> = row.get(1);
            (created, updated)
        };
        let (created0, updated0) = times(pool.clone()).await;
        assert_eq!(
            created0.to_rfc3339(),
            "2020-01-01T00:00:00+00:00",
            "{table}: created_at as set"
        );
        assert!(
            updated0 > created0 + chrono::Duration::days(365),
            "{table}: updated_at {updated0} was not set by the database on the ageing update"
        );

        let _ = exec(&pool, "SELECT pg_sleep(0.01)").await;
        let n = exec_ok(
            &pool,
            &format!("{table}: change"),
            format!(
                "UPDATE {table} SET {change}, updated_at = '2000-01-01T00:00:00Z' WHERE {key} = {}",
                lit(id)
            ),
        )
        .await;
        assert_eq!(n, 1, "{table}: one row updated");
        let (created1, updated1) = times(pool.clone()).await;
        assert_eq!(created1, created0, "{table}: created_at must not change");
        assert!(
            updated1 > updated0,
            "{table}: updated_at {updated1} not after {updated0}"
        );
    }
}
