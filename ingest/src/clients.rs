//! API clients (table `api_clients`): who may call ingest and with which
//! scopes. Issuing, listing, rotating and revoking keys (the `ingest
//! clients` commands), and the one indexed lookup the bearer check makes.
//!
//! A key reads `entrip_<prefix>_<secret>`: 12 hex digits of public prefix
//! (the lookup) and 256 random bits of secret, of which only the SHA-256 is
//! stored. One row per key; a client is a name, which keeps its keys while
//! it rotates and is never reused.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// What a client may do; each route needs one (docs/http-api.md, "API keys").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    UsersWrite,
    BookingsWrite,
    PaymentsWrite,
    PaymentsResult,
    ApprovalsWrite,
    ApprovalsDecide,
    /// Every GET.
    Read,
    /// Everything.
    All,
}

impl Scope {
    pub const EVERY: [Scope; 8] = [
        Scope::UsersWrite,
        Scope::BookingsWrite,
        Scope::PaymentsWrite,
        Scope::PaymentsResult,
        Scope::ApprovalsWrite,
        Scope::ApprovalsDecide,
        Scope::Read,
        Scope::All,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::UsersWrite => "users:write",
            Scope::BookingsWrite => "bookings:write",
            Scope::PaymentsWrite => "payments:write",
            Scope::PaymentsResult => "payments:result",
            Scope::ApprovalsWrite => "approvals:write",
            Scope::ApprovalsDecide => "approvals:decide",
            Scope::Read => "read",
            Scope::All => "*",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, ClientError> {
        Scope::EVERY
            .into_iter()
            .find(|scope| scope.as_str() == s.trim())
            .ok_or_else(|| ClientError::UnknownScope(s.to_owned()))
    }
}

/// A client's name: 1–63 of `[a-z0-9._-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientName(String);

impl ClientName {
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        let ok = (1..=63).contains(&s.len())
            && s.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
            });
        ok.then(|| Self(s.to_owned()))
            .ok_or_else(|| ClientError::InvalidName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const KEY_TAG: &str = "entrip_";
const PREFIX_HEX: usize = 12;
const SECRET_HEX: usize = 64;

/// An API key as a client presents it. `Debug` shows the prefix only.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    prefix: String,
    secret: String,
}

impl ApiKey {
    /// A new key from the operating system's random source.
    fn generate() -> Result<Self, ClientError> {
        let mut prefix = [0u8; PREFIX_HEX / 2];
        let mut secret = [0u8; SECRET_HEX / 2];
        getrandom::fill(&mut prefix).map_err(ClientError::Random)?;
        getrandom::fill(&mut secret).map_err(ClientError::Random)?;
        Ok(Self {
            prefix: hex::encode(prefix),
            secret: hex::encode(secret),
        })
    }

    /// `entrip_<12 hex>_<64 hex>`, else `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(KEY_TAG)?;
        let (prefix, secret) = rest.split_once('_')?;
        let lower_hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        (lower_hex(prefix, PREFIX_HEX) && lower_hex(secret, SECRET_HEX)).then(|| Self {
            prefix: prefix.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The public part, shown by `clients list` and used for the lookup.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn secret_sha256(&self) -> [u8; 32] {
        Sha256::digest(self.secret.as_bytes()).into()
    }

    /// The whole key; shown once, when issued.
    pub fn reveal(&self) -> String {
        format!("{KEY_TAG}{}_{}", self.prefix, self.secret)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({KEY_TAG}{}_…)", self.prefix)
    }
}

/// An authenticated caller: the client's name and its scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    pub scopes: Vec<Scope>,
}

impl Client {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| *s == scope || *s == Scope::All)
    }
}

/// A stored key, as the bearer check needs it.
#[derive(Debug, Clone)]
pub(crate) struct StoredKey {
    client: Client,
    secret_sha256: Vec<u8>,
    revoked: bool,
}

/// What a presented key is worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Valid(Client),
    /// The right secret of a revoked key.
    Revoked,
    /// No such key (wrong secret included).
    Unknown,
}

impl StoredKey {
    /// Compares the presented secret with the stored hash in constant time.
    pub(crate) fn judge(&self, key: &ApiKey) -> Verdict {
        let matches: bool = key.secret_sha256().ct_eq(&self.secret_sha256[..]).into();
        match (matches, self.revoked) {
            (false, _) => Verdict::Unknown,
            (true, true) => Verdict::Revoked,
            (true, false) => Verdict::Valid(self.client.clone()),
        }
    }
}

/// One key of a client, for `clients list`.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<Scope>,
    pub amqp_user: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "client name {0:?}: use 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error(
        "unknown scope {0:?}; scopes are users:write, bookings:write, payments:write, payments:result, approvals:write, approvals:decide, read, *"
    )]
    UnknownScope(String),
    #[error("give at least one scope (--scopes)")]
    NoScopes,
    #[error(
        "client {0} exists (names are never reused, even once revoked); rotate its key or choose another name"
    )]
    NameTaken(String),
    #[error("no client named {0}")]
    NoSuchClient(String),
    #[error("client {0} has no key with prefix {1}")]
    NoSuchKey(String, String),
    #[error("client {0} has no key left that works; create a new client")]
    Revoked(String),
    #[error("broker user {user} already acts as client {client}")]
    AmqpUserTaken { user: String, client: String },
    #[error("broker user {0:?}: 1-255 characters")]
    InvalidAmqpUser(String),
    #[error("the operating system's random source failed: {0}")]
    Random(getrandom::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

fn scopes_of(row: &sqlx::postgres::PgRow) -> sqlx::Result<Vec<Scope>> {
    let texts: Vec<String> = row.try_get("scopes")?;
    // The table's CHECK admits known scopes only.
    Ok(texts.iter().filter_map(|t| t.parse().ok()).collect())
}

/// Stores a new key of `name` (a new row) and returns it. A prefix that
/// collides with another key's is drawn again.
async fn insert_key(
    conn: &mut sqlx::PgConnection,
    name: &str,
    scopes: &[String],
    amqp_user: Option<&str>,
) -> Result<ApiKey, ClientError> {
    loop {
        let key = ApiKey::generate()?;
        let inserted = sqlx::query(
            "INSERT INTO api_clients (id, name, scopes, key_prefix, secret_sha256, amqp_user)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (key_prefix) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(scopes)
        .bind(key.prefix())
        .bind(&key.secret_sha256()[..])
        .bind(amqp_user)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(key);
        }
    }
}

/// Issues the first key of a new client. Management is rare: the table is
/// locked against concurrent `create`s so that a name and a broker user each
/// belong to one client.
pub async fn create(
    pool: &PgPool,
    name: &ClientName,
    scopes: &[Scope],
    amqp_user: Option<&str>,
) -> Result<ApiKey, ClientError> {
    if scopes.is_empty() {
        return Err(ClientError::NoScopes);
    }
    if let Some(user) = amqp_user
        && !(1..=255).contains(&user.len())
    {
        return Err(ClientError::InvalidAmqpUser(user.to_owned()));
    }
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE api_clients IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let taken: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_clients WHERE name = $1)")
            .bind(name.as_str())
            .fetch_one(&mut *tx)
            .await?;
    if taken {
        return Err(ClientError::NameTaken(name.to_string()));
    }
    if let Some(user) = amqp_user {
        let holder: Option<String> = sqlx::query_scalar(
            "SELECT name FROM api_clients WHERE amqp_user = $1 AND revoked_at IS NULL LIMIT 1",
        )
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(client) = holder {
            return Err(ClientError::AmqpUserTaken {
                user: user.to_owned(),
                client,
            });
        }
    }
    let mut texts: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    texts.sort();
    texts.dedup();
    let key = insert_key(&mut tx, name.as_str(), &texts, amqp_user).await?;
    tx.commit().await?;
    Ok(key)
}

/// Issues a new key for `name` with the scopes and broker user of its
/// newest working key; the old keys keep working until revoked. Returns
/// the new key and the prefixes of the keys still working beside it.
pub async fn rotate(
    pool: &PgPool,
    name: &ClientName,
) -> Result<(ApiKey, Vec<String>), ClientError> {
    let mut tx = pool.begin().await?;
    let newest = sqlx::query(
        "SELECT scopes, amqp_user FROM api_clients
          WHERE name = $1 AND revoked_at IS NULL
          ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
    )
    .bind(name.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = newest else {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM api_clients WHERE name = $1)")
                .bind(name.as_str())
                .fetch_one(&mut *tx)
                .await?;
        return Err(if exists {
            ClientError::Revoked(name.to_string())
        } else {
            ClientError::NoSuchClient(name.to_string())
        });
    };
    let scopes: Vec<String> = row.try_get("scopes")?;
    let amqp_user: Option<String> = row.try_get("amqp_user")?;
    let old: Vec<String> = sqlx::query_scalar(
        "SELECT key_prefix FROM api_clients WHERE name = $1 AND revoked_at IS NULL ORDER BY created_at",
    )
    .bind(name.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let key = insert_key(&mut tx, name.as_str(), &scopes, amqp_user.as_deref()).await?;
    tx.commit().await?;
    Ok((key, old))
}

/// Revokes one key of `name` (`prefix`), or every key of it. Returns how
/// many keys stopped working now.
pub async fn revoke(
    pool: &PgPool,
    name: &ClientName,
    prefix: Option<&str>,
) -> Result<u64, ClientError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT key_prefix, revoked_at IS NOT NULL FROM api_clients WHERE name = $1 FOR UPDATE",
    )
    .bind(name.as_str())
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Err(ClientError::NoSuchClient(name.to_string()));
    }
    if let Some(p) = prefix
        && !rows.iter().any(|(have, _)| have == p)
    {
        return Err(ClientError::NoSuchKey(name.to_string(), p.to_owned()));
    }
    let revoked = sqlx::query(
        "UPDATE api_clients SET revoked_at = now()
          WHERE name = $1 AND revoked_at IS NULL AND ($2::text IS NULL OR key_prefix = $2)",
    )
    .bind(name.as_str())
    .bind(prefix)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(revoked)
}

/// Every key of every client, oldest first.
pub async fn list(pool: &PgPool) -> Result<Vec<KeyInfo>, ClientError> {
    let rows = sqlx::query(
        "SELECT name, key_prefix, scopes, amqp_user, created_at, revoked_at
           FROM api_clients ORDER BY name, created_at",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(KeyInfo {
                name: row.try_get("name")?,
                prefix: row.try_get("key_prefix")?,
                scopes: scopes_of(row)?,
                amqp_user: row.try_get("amqp_user")?,
                created_at: row.try_get("created_at")?,
                revoked_at: row.try_get("revoked_at")?,
            })
        })
        .collect::<sqlx::Result<_>>()
        .map_err(ClientError::from)
}

/// The key with this prefix: one lookup by the unique index.
pub(crate) async fn lookup(pool: &PgPool, prefix: &str) -> sqlx::Result<Option<StoredKey>> {
    let row = sqlx::query(
        "SELECT name, scopes, secret_sha256, revoked_at IS NOT NULL AS revoked
           FROM api_clients WHERE key_prefix = $1",
    )
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        Ok(StoredKey {
            client: Client {
                name: row.try_get("name")?,
                scopes: scopes_of(&row)?,
            },
            secret_sha256: row.try_get("secret_sha256")?,
            revoked: row.try_get("revoked")?,
        })
    })
    .transpose()
}

/// What a broker user maps to.
pub enum AmqpUser {
    Client(Client),
    /// Every key naming the user is revoked.
    Revoked,
    Unknown,
}

/// The client whose working keys name broker user `user`, for requests that
/// arrive over AMQP (their `user_id` is validated by the broker).
pub async fn for_amqp_user(pool: &PgPool, user: &str) -> sqlx::Result<AmqpUser> {
    let row = sqlx::query(
        "SELECT name, scopes, revoked_at IS NOT NULL AS revoked FROM api_clients
          WHERE amqp_user = $1
          ORDER BY revoked_at IS NULL DESC, created_at DESC LIMIT 1",
    )
    .bind(user)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(AmqpUser::Unknown);
    };
    if row.try_get::<bool, _>("revoked")? {
        return Ok(AmqpUser::Revoked);
    }
    Ok(AmqpUser::Client(Client {
        name: row.try_get("name")?,
        scopes: scopes_of(&row)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_carry_256_bits_of_secret() {
        let key = ApiKey::generate().unwrap();
        let text = key.reveal();
        assert!(text.starts_with("entrip_"), "{text}");
        assert_eq!(text.len(), KEY_TAG.len() + PREFIX_HEX + 1 + SECRET_HEX);
        assert_eq!(ApiKey::parse(&text), Some(key.clone()));
        assert!(!format!("{key:?}").contains(&key.secret));
        assert_ne!(ApiKey::generate().unwrap(), key);
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        let good = ApiKey::generate().unwrap().reveal();
        for bad in [
            "",
            "entrip_",
            &good[..good.len() - 1],
            &good.to_uppercase(),
            &good.replace("entrip_", "other_"),
            &format!("{good}0"),
        ] {
            assert_eq!(ApiKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_and_scopes_parse_strictly() {
        assert!(ClientName::parse("booking-frontend").is_ok());
        assert!(ClientName::parse("local-dev").is_ok());
        for bad in [
            "",
            "-x",
            "Upper",
            "(before-clients)",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(ClientName::parse(bad).is_err(), "{bad}");
        }
        for scope in Scope::EVERY {
            assert_eq!(scope.as_str().parse::<Scope>().unwrap(), scope);
        }
        assert!("bookings:read".parse::<Scope>().is_err());
        let reader = Client {
            name: "dash".into(),
            scopes: vec![Scope::Read],
        };
        assert!(reader.allows(Scope::Read) && !reader.allows(Scope::BookingsWrite));
        let all = Client {
            name: "ops".into(),
            scopes: vec![Scope::All],
        };
        assert!(Scope::EVERY.iter().all(|s| all.allows(*s)));
    }
}
