//! Domain types that parse input once and are trusted afterwards: money with
//! its currency's minor units, ISO 4217 currencies, booking codes, phone
//! numbers, e-mail addresses, bounded text, idempotency keys, and the status
//! and event vocabularies.

use std::{fmt, str::FromStr};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{
    Decode, Encode, Postgres, Type,
    encode::IsNull,
    error::BoxDynError,
    postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef},
};

/// Why a value was refused; the caller attaches the field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(msg: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(msg.into()))
}

/// Stores a closed type as a `text` column: written as its text, read back
/// through its `parse`, so a row holding anything else fails to decode
/// instead of reaching the code as a string.
macro_rules! text_column {
    ($name:ty, $render:expr) => {
        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                let render: fn(&$name) -> &'static str = $render;
                <&str as Encode<Postgres>>::encode(render(self), buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<Postgres>>::decode(value)?;
                Ok(<$name>::parse(text)?)
            }
        }
    };
}

/// An ISO 4217 currency whose minor units fit the schema (at most 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    pub const KRW: Currency = Currency(iso_currency::Currency::KRW);

    pub fn parse(code: &str) -> Result<Self, Invalid> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return invalid("must be a three-letter ISO 4217 code in upper case, e.g. KRW");
        }
        let Some(c) = iso_currency::Currency::from_code(code) else {
            return invalid(format!("{code} is not an ISO 4217 currency"));
        };
        match c.exponent() {
            Some(e) if e <= 2 => Ok(Currency(c)),
            Some(_) => invalid(format!(
                "{code} has more than 2 minor units, which is not supported"
            )),
            None => invalid(format!("{code} is not a currency of payment")),
        }
    }

    pub fn code(self) -> &'static str {
        self.0.code()
    }

    /// Decimals the currency allows: KRW and JPY 0, USD and EUR 2.
    pub fn minor_units(self) -> u32 {
        self.0.exponent().map_or(2, u32::from)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

text_column!(Currency, |c| c.code());

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Currency::parse(&code).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Currency {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[A-Z]{3}$"))
            .description(Some(
                "ISO 4217 code of a currency with at most 2 minor units, e.g. KRW, USD",
            ))
            .examples(["KRW"])
            .into()
    }
}

impl utoipa::ToSchema for Currency {}

/// The largest amount `numeric(18,2)` holds.
fn max_amount() -> Decimal {
    Decimal::new(999_999_999_999_999_999, 2)
}

/// An amount in a currency, with no more decimals than the currency allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// A positive amount: `"120000.00"` KRW is 120000, `"100.50"` KRW is refused.
    pub fn new(amount: Decimal, currency: Currency) -> Result<Self, Invalid> {
        if amount <= Decimal::ZERO {
            return invalid("must be greater than 0");
        }
        Self::new_non_negative(amount, currency)
    }

    /// Zero or a positive amount (a tax, for instance).
    fn new_non_negative(amount: Decimal, currency: Currency) -> Result<Self, Invalid> {
        if amount < Decimal::ZERO {
            return invalid("must not be negative");
        }
        if amount > max_amount() {
            return invalid("is too large");
        }
        let amount = amount.normalize();
        if amount.scale() > currency.minor_units() {
            return invalid(format!(
                "{} allows at most {} decimal places",
                currency,
                currency.minor_units()
            ));
        }
        Ok(Self { amount, currency })
    }

    /// Parses a decimal string such as `"129.90"`.
    pub fn parse(text: &str, currency: Currency) -> Result<Self, Invalid> {
        Self::new(parse_decimal(text)?, currency)
    }

    /// Parses a decimal string that may be zero.
    pub fn parse_non_negative(text: &str, currency: Currency) -> Result<Self, Invalid> {
        Self::new_non_negative(parse_decimal(text)?, currency)
    }

    /// Rebuilds a stored value (already validated when it was written).
    pub fn from_stored(amount: Decimal, currency: Currency) -> Self {
        Self {
            amount: amount.normalize(),
            currency,
        }
    }

    pub fn amount(self) -> Decimal {
        self.amount
    }

    pub fn currency(self) -> Currency {
        self.currency
    }
}

fn parse_decimal(text: &str) -> Result<Decimal, Invalid> {
    let ok = !text.is_empty()
        && text.len() <= 40
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
        && text.bytes().any(|b| b.is_ascii_digit());
    if !ok {
        return invalid("must be a decimal string such as \"129.90\"");
    }
    Decimal::from_str(text).or_else(|_| invalid("must be a decimal string such as \"129.90\""))
}

/// Rendered at the currency's scale: `"350000"` KRW, `"129.90"` USD.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = self.currency.minor_units() as usize;
        write!(f, "{:.*}", scale, self.amount)
    }
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A booking code: 6–32 characters of `A-Z`, `0-9` and `-`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BookingCode(String);

impl BookingCode {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let ok = (6..=32).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            invalid("must be 6-32 characters of A-Z, 0-9 and '-'")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A phone number: 7–20 characters of digits, spaces and `+-()`, with at
/// least one digit; surrounding spaces are trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Phone(String);

impl Phone {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let t = text.trim();
        let ok = (7..=20).contains(&t.len())
            && t.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b' ' | b'+' | b'-' | b'(' | b')'))
            && t.bytes().any(|b| b.is_ascii_digit());
        if ok {
            Ok(Self(t.to_owned()))
        } else {
            invalid("must be 7-20 characters of digits, spaces and +-()")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An e-mail address in its common form `local@domain.tld`, at most 254
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let t = text.trim();
        let valid = t.len() <= 254
            && !t.chars().any(|c| c.is_whitespace() || c.is_control())
            && match t.split_once('@') {
                Some((local, domain)) => {
                    !local.is_empty()
                        && !domain.contains('@')
                        && domain.contains('.')
                        && !domain.starts_with('.')
                        && !domain.ends_with('.')
                }
                None => false,
            };
        if valid {
            Ok(Self(t.to_owned()))
        } else {
            invalid("must be an e-mail address such as kim@example.com")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Trimmed, non-empty text of at most `max` characters without control
/// characters (newlines and tabs allowed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Text(String);

impl Text {
    pub fn parse(text: &str, max: usize) -> Result<Self, Invalid> {
        let t = text.trim();
        if t.is_empty() {
            return invalid("must not be empty");
        }
        if t.chars().count() > max {
            return invalid(format!("must be at most {max} characters"));
        }
        if t.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return invalid("must not contain control characters");
        }
        Ok(Self(t.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An `Idempotency-Key`: 16–255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let ok = (16..=255).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            invalid("must be 16-255 visible ASCII characters")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Declares a closed vocabulary stored as text: parse, render, serde.
macro_rules! vocabulary {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Result<Self, Invalid> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => invalid(format!(
                        "must be one of {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        text_column!($name, |v| v.as_str());

        // By hand: utoipa's derive does not see serde renames made by a
        // macro, and would list the Rust names (`Pending`, not `PENDING`).
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }
    };
}

vocabulary!(
    /// Status of a booking.
    BookingStatus { Pending => "PENDING", Confirmed => "CONFIRMED", Canceled => "CANCELED" }
);
vocabulary!(
    /// Status of a payment.
    PaymentStatus { Pending => "PENDING", Approved => "APPROVED", Failed => "FAILED" }
);
vocabulary!(
    /// How a payment is made.
    PaymentMethod {
        Card => "CARD",
        BankTransfer => "BANK_TRANSFER",
        VirtualAccount => "VIRTUAL_ACCOUNT",
        Mobile => "MOBILE",
        Points => "POINTS",
    }
);
vocabulary!(
    /// Status of an approval.
    ApprovalStatus { Pending => "PENDING", Approved => "APPROVED", Rejected => "REJECTED" }
);
vocabulary!(
    /// The outcome a payment gateway reports, or an approver decides.
    Decision { Approved => "APPROVED", Rejected => "REJECTED" }
);
vocabulary!(
    /// The outcome a payment gateway reports.
    PaymentOutcome { Approved => "APPROVED", Failed => "FAILED" }
);
vocabulary!(
    /// The kind of entity an audit row or an event is about.
    AggregateType {
        User => "user",
        Booking => "booking",
        Payment => "payment",
        Approval => "approval",
        Settlement => "settlement",
    }
);
vocabulary!(
    /// Event types; each is also the routing key on `entrip.events`.
    EventType {
        UserCreated => "user.created",
        BookingCreated => "booking.created",
        BookingConfirmed => "booking.confirmed",
        BookingCanceled => "booking.canceled",
        PaymentRequested => "payment.requested",
        PaymentApproved => "payment.approved",
        PaymentFailed => "payment.failed",
        ApprovalRequested => "approval.requested",
        ApprovalDecided => "approval.decided",
        SettlementRecorded => "settlement.recorded",
    }
);

impl EventType {
    /// The kind of entity events of this type carry in `data`.
    pub fn aggregate(self) -> AggregateType {
        match self {
            Self::UserCreated => AggregateType::User,
            Self::BookingCreated | Self::BookingConfirmed | Self::BookingCanceled => {
                AggregateType::Booking
            }
            Self::PaymentRequested | Self::PaymentApproved | Self::PaymentFailed => {
                AggregateType::Payment
            }
            Self::ApprovalRequested | Self::ApprovalDecided => AggregateType::Approval,
            Self::SettlementRecorded => AggregateType::Settlement,
        }
    }
}

/// Renders a stored amount at its currency's scale: `"350000"` KRW, `"129.90"` USD.
pub fn render_stored(amount: Decimal, currency: Currency) -> String {
    Money::from_stored(amount, currency).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    #[test]
    fn money_respects_minor_units() {
        let krw = Currency::KRW;
        assert_eq!(Money::parse("350000", krw).unwrap().to_string(), "350000");
        assert_eq!(
            Money::parse("120000.00", krw).unwrap().to_string(),
            "120000"
        );
        assert!(Money::parse("100.50", krw).is_err());
        assert_eq!(Money::parse("129.9", usd()).unwrap().to_string(), "129.90");
        assert_eq!(Money::parse("129.90", usd()).unwrap().to_string(), "129.90");
        assert!(Money::parse("129.901", usd()).is_err());
        let jpy = Currency::parse("JPY").unwrap();
        assert!(Money::parse("1.5", jpy).is_err());
    }

    #[test]
    fn money_refuses_non_positive_and_garbage() {
        for bad in [
            "0",
            "-1",
            "",
            "abc",
            "1e5",
            " 10",
            "1,000",
            "99999999999999999",
        ] {
            assert!(Money::parse(bad, usd()).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Money::parse_non_negative("0", usd()).unwrap().to_string(),
            "0.00"
        );
        assert!(Money::parse_non_negative("-0.01", usd()).is_err());
        assert!(Money::parse("9999999999999999.99", usd()).is_ok());
    }

    #[test]
    fn currencies() {
        assert_eq!(Currency::parse("KRW").unwrap().minor_units(), 0);
        assert_eq!(Currency::parse("EUR").unwrap().minor_units(), 2);
        for bad in ["krw", "KR", "KRWW", "ABC", "XAU", "BHD", ""] {
            assert!(Currency::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn booking_codes() {
        assert!(BookingCode::parse("ABC-123").is_ok());
        assert!(BookingCode::parse("ABCDE").is_err());
        assert!(BookingCode::parse(&"A".repeat(33)).is_err());
        assert!(BookingCode::parse("abc-123").is_err());
        assert!(BookingCode::parse("ABC_123").is_err());
    }

    #[test]
    fn phones_emails_text_keys() {
        assert_eq!(
            Phone::parse(" +82 (10) 1234-5678 ").unwrap().as_str(),
            "+82 (10) 1234-5678"
        );
        assert!(Phone::parse("123456").is_err());
        assert!(Phone::parse("+++++++").is_err());
        assert!(Phone::parse("010-1234-567a").is_err());
        assert!(Email::parse("kim@example.com").is_ok());
        for bad in [
            "kim",
            "kim@",
            "@x.com",
            "kim@localhost",
            "a b@x.com",
            "a@b@c.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Text::parse("  hi ", 5).unwrap().as_str(), "hi");
        assert!(Text::parse("   ", 5).is_err());
        assert!(Text::parse("123456", 5).is_err());
        assert!(Text::parse("a\u{0}b", 5).is_err());
        assert!(IdempotencyKey::parse("0123456789abcdef").is_ok());
        assert!(IdempotencyKey::parse("0123456789abcde").is_err());
        assert!(IdempotencyKey::parse("0123456789 abcdef").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }

    #[test]
    fn vocabularies_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()).unwrap(), *t);
        }
        assert!(PaymentOutcome::parse("approved").is_err());
    }
}
