//! The JSON Schema of each request body (what `docs/schemas/requests/`
//! holds, cut out of the OpenAPI document the server serves) and the server
//! agree, both ways, on bodies proptest makes: for each body, bodies the
//! schema accepts (fields of every form the server takes: surrounding and
//! inner whitespace, non-ASCII text, times with any offset, amounts with
//! leading and trailing zeros, absent and null optional fields) are never
//! answered 400 — 404, 409 and 422 are fine, the ids are mostly random and
//! the rules across fields or entities are beyond the schema; then one
//! mutation of such a body (a field removed, null, of another type, too
//! long, a near miss of its pattern, random text, an unknown field) is
//! judged by a JSON Schema validator (the `jsonschema` crate): a body it
//! refuses must be a 400 problem+json naming that field in
//! `errors[].field`, a body it accepts must not be a 400.
//!
//! The decimals a currency allows, a rule across fields that the booking
//! and payment schemas express (`allOf` of `if`/`then`), is also applied
//! by the test with the domain's own `Money`, as a second opinion. The
//! documented differences (dates such as
//! February 30, UUIDs in their other forms, e-mail addresses over 254
//! bytes, more than 28 decimals) are not generated.
//!
//! 64 cases per body (`PROPTEST_CASES` sets another number), from a fixed
//! seed; `ENTRIP_PROPTEST_RANDOM=1` draws a new one each run.

use std::collections::BTreeMap;

use entrip_common::domain::{Currency, Money};
use proptest::{
    collection::vec,
    prelude::*,
    sample::{Index, select},
    string::string_regex,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};
use serde_json::{Map, Value, json};
use sqlx::PgPool;

use crate::support::{Server, authenticated, into_resp, key};

/// What a body field is, for generating its values.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `Text` of at most this many characters; optional when `false`.
    Text(usize, bool),
    Code,
    Phone,
    Email,
    /// A user's id (a fixture user, or a random UUID).
    UserId,
    /// A booking's id (the fixture booking, or a random UUID).
    BookingId,
    Time,
    /// An amount (> 0) in the body's currency.
    Amount,
    /// A tax (>= 0) in the body's currency.
    Tax,
    /// The body's currency; optional (KRW) when `false`.
    Currency(bool),
    /// One of the schema's `enum` values.
    Choice,
    Flag,
    Steps,
}

/// A body's fields and their kinds.
type Fields = Vec<(&'static str, Kind)>;

/// Each request body: its route (`{id}`: the entity's) and its fields.
fn bodies() -> BTreeMap<&'static str, (&'static str, Fields)> {
    use Kind::*;
    BTreeMap::from([
        (
            "user.create",
            (
                "/v1/users",
                vec![
                    ("name", Text(100, true)),
                    ("email", Email),
                    ("phone", Phone),
                ],
            ),
        ),
        (
            "booking.create",
            (
                "/v1/bookings",
                vec![
                    ("code", Code),
                    ("customerName", Text(100, true)),
                    ("customerPhone", Phone),
                    ("itineraryFrom", Text(100, true)),
                    ("itineraryTo", Text(100, true)),
                    ("departAt", Time),
                    ("arriveAt", Time),
                    ("currency", Currency(false)),
                    ("amount", Amount),
                    ("userId", UserId),
                    ("requiresApproval", Flag),
                ],
            ),
        ),
        (
            "booking.cancel",
            (
                "/v1/bookings/{id}/cancel",
                vec![("reason", Text(1000, true))],
            ),
        ),
        (
            "payment.create",
            (
                "/v1/payments",
                vec![
                    ("bookingId", BookingId),
                    ("method", Choice),
                    ("amount", Amount),
                    ("currency", Currency(true)),
                    ("tax", Tax),
                ],
            ),
        ),
        (
            "payment.result",
            (
                "/v1/payments/{id}/result",
                vec![
                    ("status", Choice),
                    ("approvalId", Text(100, false)),
                    ("reason", Text(1000, false)),
                ],
            ),
        ),
        (
            "approval.create",
            (
                "/v1/approvals",
                vec![
                    ("bookingId", BookingId),
                    ("requesterId", UserId),
                    ("title", Text(200, true)),
                    ("reason", Text(1000, true)),
                    ("steps", Steps),
                ],
            ),
        ),
        (
            "approval.decision",
            (
                "/v1/approvals/{id}/decision",
                vec![
                    ("approverId", UserId),
                    ("decision", Choice),
                    ("reason", Text(1000, false)),
                ],
            ),
        ),
    ])
}

/// Ids that exist, so that some bodies get past the 404s.
#[derive(Debug, Clone)]
struct Fixtures {
    user: String,
    booking: String,
}

fn random_uuid() -> BoxedStrategy<String> {
    (any::<u128>(), any::<bool>())
        .prop_map(|(n, upper)| {
            let id = uuid::Uuid::from_u128(n).to_string();
            if upper { id.to_uppercase() } else { id }
        })
        .boxed()
}

fn id(existing: String) -> BoxedStrategy<Value> {
    prop_oneof![Just(existing), random_uuid()]
        .prop_map(Value::from)
        .boxed()
}

/// White_Space, which the server trims from the ends of text.
fn space() -> BoxedStrategy<char> {
    select(vec![
        ' ', '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{85}', '\u{A0}', '\u{2028}', '\u{3000}',
    ])
    .boxed()
}

/// A character that is neither whitespace nor a control character.
fn solid() -> BoxedStrategy<char> {
    prop_oneof![
        3 => proptest::char::range('a', 'z'),
        1 => proptest::char::range('A', 'Z'),
        1 => proptest::char::range('0', '9'),
        2 => select(vec!['김', '민', '지', 'é', 'ß', '✈', '😀', '\u{FEFF}', '\u{200B}', '.', '-', '\'', '&']),
        1 => any::<char>().prop_filter("solid", |c| !c.is_whitespace() && !c.is_control()),
    ]
    .boxed()
}

/// A character allowed inside text: solid, or a space, tab, newline, …
fn inner() -> BoxedStrategy<char> {
    prop_oneof![
        4 => solid(),
        1 => select(vec![' ', '\t', '\n', '\u{2028}', '\u{3000}', '\u{A0}']),
    ]
    .boxed()
}

fn padded(core: BoxedStrategy<String>) -> BoxedStrategy<String> {
    (
        prop_oneof![3 => Just(vec![]), 1 => vec(space(), 1..4)],
        core,
        prop_oneof![3 => Just(vec![]), 1 => vec(space(), 1..4)],
    )
        .prop_map(|(before, core, after)| {
            before
                .into_iter()
                .chain(core.chars())
                .chain(after)
                .collect()
        })
        .boxed()
}

/// Text the server accepts: 1 to `max` characters once trimmed.
fn text(max: usize) -> BoxedStrategy<Value> {
    let middle = max.saturating_sub(2);
    let core = (
        solid(),
        prop_oneof![
            4 => vec(inner(), 0..12),
            1 => vec(inner(), middle.saturating_sub(3)..=middle),
        ],
        proptest::option::of(solid()),
    )
        .prop_map(|(first, middle, last)| {
            let mut s: String = std::iter::once(first).chain(middle).collect();
            match last {
                Some(c) => s.push(c),
                // One character alone, or trimmed: drop the inner tail.
                None => s.truncate(first.len_utf8()),
            }
            s
        })
        .boxed();
    padded(core).prop_map(Value::from).boxed()
}

fn regex(re: &str) -> BoxedStrategy<String> {
    string_regex(re).unwrap().boxed()
}

fn phone() -> BoxedStrategy<Value> {
    padded(
        regex(r"[0-9+()\-][0-9 +()\-]{5,18}[0-9+()\-]")
            .prop_filter("a digit", |s| s.bytes().any(|b| b.is_ascii_digit()))
            .boxed(),
    )
    .prop_map(Value::from)
    .boxed()
}

fn email() -> BoxedStrategy<Value> {
    padded(
        prop_oneof![
            regex(r"[a-zA-Z0-9._%+\-]{1,30}@[a-z0-9\-]{1,20}(\.[a-z0-9\-]{1,10}){1,2}"),
            regex(r"[김민지a-z]{1,8}@[a-z]{1,8}\.[a-z]{2,3}"),
        ]
        .boxed(),
    )
    .prop_map(Value::from)
    .boxed()
}

/// An RFC 3339 time in any of the forms chrono reads.
fn time() -> BoxedStrategy<Value> {
    (
        0i64..4_102_444_800, // 1970 to 2100
        -(23 * 60 + 59)..=(23 * 60 + 59i64),
        select(vec!["T", "t", " "]),
        0usize..12,
        select(vec!["Z", "z", "+", "-", "\u{2212}"]),
        any::<bool>(),
    )
        .prop_map(|(secs, offset_min, sep, frac, zone, leap)| {
            let offset_min = if matches!(zone, "Z" | "z") {
                0
            } else {
                offset_min
            };
            let local = chrono::DateTime::from_timestamp(secs + offset_min * 60, 0)
                .unwrap()
                .naive_utc();
            let seconds = if leap && local.format("%S").to_string() == "59" {
                "60".to_owned()
            } else {
                local.format("%S").to_string()
            };
            let fraction = if frac == 0 {
                String::new()
            } else {
                format!(
                    ".{}",
                    "1234567890123".chars().take(frac).collect::<String>()
                )
            };
            let zone = match zone {
                "Z" | "z" => zone.to_owned(),
                _ => {
                    let minus = matches!(zone, "-" | "\u{2212}");
                    // A minus sign (either) for a negative offset, or
                    // for zero ("-00:00").
                    let sign = match (offset_min.signum(), minus) {
                        (-1 | 0, true) => zone,
                        (-1, false) => "-",
                        _ => "+",
                    };
                    let m = offset_min.abs();
                    format!("{sign}{:02}:{:02}", m / 60, m % 60)
                }
            };
            Value::from(format!(
                "{}{sep}{}:{seconds}{fraction}{zone}",
                local.format("%Y-%m-%d"),
                local.format("%H:%M")
            ))
        })
        .boxed()
}

/// Decimals `code` allows (0 or 2), as the server counts them.
fn decimals(code: &str) -> usize {
    let currency = Currency::parse(code).unwrap();
    if Money::parse("0.01", currency).is_ok() {
        2
    } else {
        0
    }
}

/// An amount greater than 0 with at most `decimals` significant decimals.
fn amount(decimals: usize) -> BoxedStrategy<Value> {
    let zeros = || regex("0{0,3}");
    let whole = (zeros(), regex("[1-9][0-9]{0,15}")).prop_map(|(z, n)| format!("{z}{n}"));
    let fraction = if decimals == 2 {
        prop_oneof![
            Just(String::new()),
            Just(".".to_owned()),
            (regex("[0-9]{1,2}"), zeros()).prop_map(|(d, z)| format!(".{d}{z}")),
        ]
        .boxed()
    } else {
        prop_oneof![
            Just(String::new()),
            Just(".".to_owned()),
            zeros().prop_map(|z| format!(".{z}"))
        ]
        .boxed()
    };
    let mut forms = vec![
        (whole, fraction)
            .prop_map(|(w, f)| format!("{w}{f}"))
            .boxed(),
    ];
    if decimals == 2 {
        // Under 1: "0.5", ".05", "00.50".
        forms.push(
            (regex("0{0,2}"), regex("[1-9]|0[1-9]|[1-9][0-9]"), zeros())
                .prop_map(|(z, d, t)| format!("{z}.{d}{t}"))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(forms)
        .prop_map(Value::from)
        .boxed()
}

/// A tax: an amount, or zero in one of its forms.
fn tax(decimals: usize) -> BoxedStrategy<Value> {
    prop_oneof![
        2 => amount(decimals),
        1 => select(vec!["0", "00", "0.", "0.00", ".0", "-0", "-0.0"]).prop_map(Value::from),
    ]
    .boxed()
}

/// The schema's `enum` values of `field` (without `null`).
fn choices(schema: &Value, field: &str) -> Vec<Value> {
    schema["properties"][field]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("{field} has an enum"))
        .iter()
        .filter(|v| !v.is_null())
        .cloned()
        .collect()
}

/// Absent, null, or a value of `valid`.
fn optional(valid: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        3 => valid.prop_map(Some),
    ]
    .boxed()
}

/// A value the server accepts for a field of `kind` (`None`: absent).
fn valid(
    kind: Kind,
    field: &str,
    schema: &Value,
    fx: &Fixtures,
    currency: &str,
) -> BoxedStrategy<Option<Value>> {
    let some = |s: BoxedStrategy<Value>| s.prop_map(Some).boxed();
    match kind {
        Kind::Text(max, true) => some(text(max)),
        Kind::Text(max, false) => optional(text(max)),
        Kind::Code => some(regex(r"[A-Z0-9\-]{6,32}").prop_map(Value::from).boxed()),
        Kind::Phone => some(phone()),
        Kind::Email => some(email()),
        Kind::UserId => some(id(fx.user.clone())),
        Kind::BookingId => some(id(fx.booking.clone())),
        Kind::Time => some(time()),
        Kind::Amount => some(amount(decimals(currency))),
        Kind::Tax => some(tax(decimals(currency))),
        // Chosen with the body (`body`).
        Kind::Currency(_) => Just(Some(Value::from(currency))).boxed(),
        Kind::Choice => some(select(choices(schema, field)).boxed()),
        Kind::Flag => optional(any::<bool>().prop_map(Value::from).boxed()),
        Kind::Steps => optional((1i64..=5).prop_map(Value::from).boxed()),
    }
}

/// A body the schema and the server accept.
fn body(
    fields: &[(&'static str, Kind)],
    schema: &Value,
    fx: &Fixtures,
) -> BoxedStrategy<Map<String, Value>> {
    let currency = fields.iter().find_map(|(name, kind)| match kind {
        Kind::Currency(required) => Some((*name, *required)),
        _ => None,
    });
    let codes: Vec<String> = currency
        .map(|(name, _)| {
            choices(schema, name)
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_else(|| vec!["KRW".to_owned()]);
    // The currency, and whether an optional one is sent (else absent or
    // null: KRW).
    let chosen = (select(codes), 0u8..4);
    let fields = fields.to_vec();
    let (schema, fx) = (schema.clone(), fx.clone());
    chosen
        .prop_flat_map(move |(code, sent)| {
            let optional_absent = matches!(currency, Some((_, false))) && sent < 2;
            let effective = if optional_absent {
                "KRW".to_owned()
            } else {
                code
            };
            let parts: Vec<BoxedStrategy<(&'static str, Option<Value>)>> = fields
                .iter()
                .map(|&(name, kind)| {
                    let value = match kind {
                        Kind::Currency(false) if optional_absent => {
                            Just(if sent == 0 { None } else { Some(Value::Null) }).boxed()
                        }
                        _ => valid(kind, name, &schema, &fx, &effective),
                    };
                    value.prop_map(move |v| (name, v)).boxed()
                })
                .collect();
            parts
        })
        .prop_map(|parts| {
            parts
                .into_iter()
                .filter_map(|(name, v)| v.map(|v| (name.to_owned(), v)))
                .collect()
        })
        .boxed()
}

/// Values of every type, as candidates for any field.
fn wrong_types() -> BoxedStrategy<Value> {
    select(vec![
        json!(7),
        json!(0),
        json!(-1),
        json!(2.5),
        json!(1.0),
        json!(1e20),
        json!(true),
        json!(false),
        json!([]),
        json!(["x"]),
        json!({}),
        json!({"a": 1}),
        json!(""),
        json!("x"),
        Value::Null,
    ])
    .boxed()
}

/// Any text, control characters included.
fn random_text() -> BoxedStrategy<Value> {
    vec(any::<char>(), 0..40)
        .prop_map(|cs| Value::from(cs.into_iter().collect::<String>()))
        .boxed()
}

/// Candidates for a field of `kind`: near misses of what it accepts, too
/// long values, random text, other types; valid or not, the validator
/// judges each.
fn candidates(kind: Kind, field: &str, schema: &Value) -> BoxedStrategy<Value> {
    let near: Vec<Value> = match kind {
        Kind::Text(..) => vec![
            json!(""),
            json!("   "),
            json!("\t\n"),
            json!("a\u{0}b"),
            json!("a\rb"),
            json!("a\u{7}"),
            json!("\u{85}a\u{85}"),
            json!(" a\r"),
            json!("a\u{9F}b"),
            json!("\u{FEFF}"),
        ],
        Kind::Code => vec![
            json!("abc-123"),
            json!("ABC_123"),
            json!("ABCDE"),
            json!("ABCDEF"),
            json!(" ABC-123"),
            json!("ABC 123"),
            json!("ÀBC-123"),
        ],
        Kind::Phone => vec![
            json!("123456"),
            json!("1234567"),
            json!("+++++++"),
            json!("010-1234-567a"),
            json!("010\t1234\t5678"),
            json!("  12345 6  "),
            json!("123456789012345678901"),
        ],
        Kind::Email => vec![
            json!("kim"),
            json!("kim@"),
            json!("@x.com"),
            json!("kim@localhost"),
            json!("a b@x.com"),
            json!("a@b@c.com"),
            json!("kim@.com"),
            json!("kim@x."),
            json!("kim@x..y"),
            json!(" kim@example.com "),
            json!("kim@exam\u{0}ple.com"),
        ],
        Kind::UserId | Kind::BookingId => vec![
            json!("not-a-uuid"),
            json!("0193a5e2-7c4b-7d10-9a3e-5f6b7c8d9e0"),
            json!("0193a5e2-7c4b-7d10-9a3e-5f6b7c8d9e0fa"),
            json!("0193a5e2_7c4b_7d10_9a3e_5f6b7c8d9e0f"),
            json!("g193a5e2-7c4b-7d10-9a3e-5f6b7c8d9e0f"),
        ],
        Kind::Time => vec![
            json!("2026-13-01T00:00:00Z"),
            json!("2026-12-24T24:00:00Z"),
            json!("2026-12-24T09:30:00"),
            json!("2026-12-24T09:30:00+24:00"),
            json!("2026-12-24T09:30:00+09:60"),
            json!("2026-12-24T09:30:00+0900"),
            json!("2026-12-24T09:30Z"),
            json!("2026-12-24"),
            json!("yesterday"),
            json!("2026-12-24T09:30:00.Z"),
            json!(" 2026-12-24T09:30:00Z"),
            json!("2026-12-31T23:59:60.5-00:00"),
        ],
        Kind::Amount | Kind::Tax => vec![
            json!("0"),
            json!("0.00"),
            json!("-1"),
            json!("-0"),
            json!("1e5"),
            json!("1,000"),
            json!(" 10"),
            json!("10.001"),
            json!("10.5"),
            json!("10.50"),
            json!(".5"),
            json!("5."),
            json!("."),
            json!("-"),
            json!("1.2.3"),
            json!("abc"),
            json!("9999999999999999.99"),
            json!("10000000000000000"),
            json!(format!("{}1", "0".repeat(39))),
            json!(format!("{}1", "0".repeat(40))),
        ],
        Kind::Currency(_) => vec![
            json!("krw"),
            json!("XAU"),
            json!("ABC"),
            json!("KR"),
            json!("BHD"),
            json!("USD"),
            json!("KRW"),
            json!("JPY"),
        ],
        Kind::Choice => {
            let mut v = choices(schema, field);
            let lower: Vec<Value> = v
                .iter()
                .map(|c| json!(c.as_str().unwrap_or_default().to_lowercase()))
                .collect();
            v.extend(lower);
            v
        }
        Kind::Flag => vec![json!("true"), json!(1), json!(0)],
        Kind::Steps => vec![
            json!(0),
            json!(1),
            json!(5),
            json!(6),
            json!(-1),
            json!(2.5),
            json!(3.0),
            json!("3"),
        ],
    };
    let too_long = match kind {
        Kind::Text(max, _) => Some(max + 1),
        Kind::Code => Some(33),
        Kind::Phone => Some(21),
        Kind::Email => Some(255),
        _ => None,
    };
    let mut union = vec![
        (3, select(near).boxed()),
        (1, random_text()),
        (2, wrong_types()),
    ];
    if let Some(n) = too_long {
        let long = (n..n + 8).prop_map(move |len| match kind {
            Kind::Email => json!(format!("{}@example.com", "k".repeat(len - 12))),
            Kind::Phone => json!("1".repeat(len)),
            _ => json!("A".repeat(len)),
        });
        union.push((2, long.boxed()));
    }
    proptest::strategy::Union::new_weighted(union).boxed()
}

/// How a valid body is changed.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(&'static str),
    Null(&'static str),
    Set(&'static str, Value),
    Unknown(String, Value),
}

#[derive(Debug, Clone)]
struct Case {
    body: Map<String, Value>,
    mutation: Mutation,
    /// The entity's id in the path, for the commands on one.
    entity: String,
}

fn cases(fields: &[(&'static str, Kind)], schema: &Value, fx: &Fixtures) -> BoxedStrategy<Case> {
    let names: Vec<&'static str> = fields.iter().map(|(n, _)| *n).collect();
    let per_field: Vec<BoxedStrategy<Value>> = fields
        .iter()
        .map(|&(name, kind)| candidates(kind, name, schema))
        .collect();
    let known = names.clone();
    let unknown = (
        regex("[a-zA-Z_][a-zA-Z0-9_]{0,12}")
            .prop_filter("not a field", move |k| !known.contains(&k.as_str())),
        wrong_types(),
    );
    (
        body(fields, schema, fx),
        any::<Index>(),
        per_field,
        unknown,
        0u8..10,
        prop_oneof![Just(fx.booking.clone()), random_uuid()],
    )
        .prop_map(
            move |(body, field, mut values, (name, value), how, entity)| {
                let i = field.index(names.len());
                let mutation = match how {
                    0 => Mutation::Remove(names[i]),
                    1 => Mutation::Null(names[i]),
                    2 => Mutation::Unknown(name, value),
                    _ => Mutation::Set(names[i], values.swap_remove(i)),
                };
                Case {
                    body,
                    mutation,
                    entity,
                }
            },
        )
        .boxed()
}

/// The field the server refuses for its currency's decimals (the rule
/// beyond the schema), if any.
fn refused_for_decimals(
    body: &Map<String, Value>,
    optional_currency: bool,
) -> Option<&'static str> {
    let code = match body.get("currency") {
        None | Some(Value::Null) if optional_currency => "KRW",
        Some(Value::String(c)) => c.as_str(),
        _ => return None,
    };
    let currency = Currency::parse(code).ok()?;
    for field in ["amount", "tax"] {
        if let Some(Value::String(text)) = body.get(field) {
            let ok = if field == "amount" {
                Money::parse(text, currency).is_ok()
            } else {
                Money::parse_non_negative(text, currency).is_ok()
            };
            if !ok {
                return Some(field);
            }
        }
    }
    None
}

/// Sends `body` and checks the answer against what the validator (and the
/// decimals rule) expect; true when the body was to be refused.
async fn check(
    client: &reqwest::Client,
    url: &str,
    validator: &jsonschema::Validator,
    body: &Map<String, Value>,
    field: &str,
    optional_currency: bool,
) -> Result<bool, TestCaseError> {
    let value = Value::Object(body.clone());
    // The fields a refusal may name: the mutated one, and each field the
    // validator points at (a rule across fields, such as the decimals of
    // a currency, points at the amount when the currency was changed).
    let refused: Option<Vec<String>> = if !validator.is_valid(&value) {
        let mut named = vec![field.to_owned()];
        for error in validator.iter_errors(&value) {
            let path = error.instance_path().to_string();
            if let Some(first) = path.trim_start_matches('/').split('/').next()
                && !first.is_empty()
            {
                named.push(first.replace("~1", "/").replace("~0", "~"));
            }
        }
        Some(named)
    } else {
        refused_for_decimals(body, optional_currency).map(|f| vec![f.to_owned()])
    };
    let resp = client
        .post(url)
        .header("idempotency-key", key())
        .header("content-type", "application/json")
        .body(value.to_string())
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("request failed: {e}")))?;
    let r = into_resp(resp).await;
    let fields = r.error_fields();
    match &refused {
        Some(named) => {
            prop_assert_eq!(
                r.status.as_u16(),
                400,
                "the schema refuses {} (at {:?}), the server answered {:?}",
                value,
                named,
                r.body
            );
            prop_assert!(r.is_problem(), "a problem+json: {:?}", r.body);
            prop_assert!(
                named.iter().any(|f| fields.contains(f)),
                "the answer names one of {named:?}: {:?}",
                r.body
            );
        }
        None => {
            prop_assert!(
                r.status.as_u16() != 400 && r.status.as_u16() < 500,
                "the schema accepts {}, the server answered {} {:?}",
                value,
                r.status,
                r.body
            );
        }
    }
    Ok(refused.is_some())
}

fn runner() -> TestRunner {
    let config = Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    if std::env::var_os("ENTRIP_PROPTEST_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]))
    }
}

/// Runs every body's cases; the failures, one line each.
fn run_all(
    base: String,
    api_key: String,
    fx: Fixtures,
    schemas: BTreeMap<String, Value>,
) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = authenticated(&api_key);
    let mut failures = Vec::new();
    for (name, (route, fields)) in bodies() {
        let schema = &schemas[name];
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(false)
            .build(schema)
            .unwrap();
        let declared: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let listed: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        assert_eq!(declared, sorted, "{name}: the test knows every field");
        let optional_currency = fields
            .iter()
            .any(|(_, k)| matches!(k, Kind::Currency(false)));
        let mut runner = runner();
        // Mutated bodies the schema refused, and accepted: both must occur.
        let outcomes = std::cell::Cell::new((0u32, 0u32));
        let result = runner.run(&cases(&fields, schema, &fx), |case| {
            let url = format!("{base}{}", route.replace("{id}", &case.entity));
            rt.block_on(async {
                // The body as generated: the schema must accept it.
                let value = Value::Object(case.body.clone());
                prop_assert!(
                    validator.is_valid(&value),
                    "{name}: the generated body {} is refused by the schema: {:?}",
                    value,
                    validator
                        .iter_errors(&value)
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                );
                let refused =
                    check(&client, &url, &validator, &case.body, "", optional_currency).await?;
                prop_assert!(!refused, "a generated body is valid");
                let mut body = case.body.clone();
                let field = match &case.mutation {
                    Mutation::Remove(f) => {
                        body.remove(*f);
                        f.to_string()
                    }
                    Mutation::Null(f) => {
                        body.insert(f.to_string(), Value::Null);
                        f.to_string()
                    }
                    Mutation::Set(f, v) => {
                        body.insert(f.to_string(), v.clone());
                        f.to_string()
                    }
                    Mutation::Unknown(f, v) => {
                        body.insert(f.clone(), v.clone());
                        f.clone()
                    }
                };
                let refused =
                    check(&client, &url, &validator, &body, &field, optional_currency).await?;
                let (no, yes) = outcomes.get();
                outcomes.set(if refused {
                    (no + 1, yes)
                } else {
                    (no, yes + 1)
                });
                Ok(())
            })
        });
        let (refused, accepted) = outcomes.get();
        match result {
            Err(err) => failures.push(format!("{name}: {err}")),
            Ok(()) if refused == 0 || accepted == 0 => failures.push(format!(
                "{name}: of the mutated bodies {refused} were refused and {accepted} accepted; both must occur"
            )),
            Ok(()) => eprintln!("{name}: mutated bodies refused {refused}, accepted {accepted}"),
        }
    }
    failures
}

#[sqlx::test(migrator = "entrip_common::db::MIGRATOR")]
async fn request_schemas_and_the_server_agree_on_generated_bodies(pool: PgPool) {
    let s = Server::start(pool).await;
    let user = s.create_user().await;
    let booking = s.create_booking(&user, false).await;
    let doc = into_resp(
        reqwest::get(format!("{}/openapi.json", s.base))
            .await
            .unwrap(),
    )
    .await
    .body;
    let schemas = entrip_ingest::openapi::request_schemas(&doc).unwrap();
    let fx = Fixtures {
        user,
        booking: booking["id"].as_str().unwrap().to_owned(),
    };
    let (base, api_key) = (s.base.clone(), s.api_key.clone());
    let failures = tokio::task::spawn_blocking(move || run_all(base, api_key, fx, schemas))
        .await
        .unwrap();
    s.stop().await;
    assert!(
        failures.is_empty(),
        "the schemas and the server disagree:\n{}",
        failures.join("\n")
    );
}
