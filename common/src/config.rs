//! Layered configuration: built-in defaults → `config/default.toml` →
//! the file named by `ENTRIP_CONFIG` → `ENTRIP__SECTION__KEY` environment
//! variables; `DATABASE_URL` and `AMQP_URL` are honoured too. A bad value
//! stops start-up with one line that names the key.
//!
//! The database password: the one in `database.url` if it has one, else the
//! content of `database.password_file` (the file `scripts/services` writes
//! for the role `entrip`) when that file exists, else whatever libpq's
//! conventions give sqlx (`PGPASSWORD`, `~/.pgpass`).

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::consumer::ConsumerSettings;
use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration error: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration error: key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// Every setting of every service; each binary reads the sections it needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub log: LogSettings,
    pub ingest: IngestSettings,
    pub dispatcher: DispatcherSettings,
    pub workers: WorkersSettings,
    pub notifications: NotificationsSettings,
    pub integrity: IntegritySettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// The database is created when it does not exist and the role may
    /// create databases.
    pub url: String,
    /// Where the password is kept when `url` has none:
    /// `$XDG_CONFIG_HOME/entrip/postgres-entrip.password` (else
    /// `$HOME/.config/...`) unless set; an empty value turns it off. A
    /// missing file is no error (sqlx's `PGPASSWORD` and pgpass support
    /// apply then); one that exists but cannot be read is.
    pub password_file: Option<PathBuf>,
    /// The password read from `password_file`, filled in by
    /// [`Settings::load`]; never serialised.
    #[serde(skip)]
    pub password: Option<Password>,
    /// The pool's size. A few per core of the database: transactions beyond
    /// what its cores run at once only queue inside PostgreSQL, where
    /// every one of them slows the others (docs/configuration.md).
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before it gets a 503.
    pub acquire_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    /// How long a service keeps retrying the first connection at start-up.
    pub startup_timeout_secs: u64,
}

/// A database password that `Debug` does not print.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// A broker node, or several nodes of one cluster separated by commas.
    pub url: String,
    /// The nodes of one cluster; when set, it takes the place of `url`.
    pub urls: Vec<String>,
    /// How long one node may take to accept a connection (TCP and the AMQP
    /// handshake) before the next node is tried.
    pub connect_timeout_ms: u64,
    /// `x-delivery-limit` of the worker queues: deliveries before a message
    /// that keeps failing (e.g. crashing its consumer) is dead-lettered.
    pub delivery_limit: u32,
    /// The growing delays of the retry path, one TTL queue each.
    pub retry_delays_ms: Vec<u64>,
    /// The node in `nodes()` this process last connected to, shared by its
    /// connections (clones share it): a reconnect tries that node first,
    /// then the next ones in order.
    #[serde(skip)]
    pub last_node: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl AmqpSettings {
    /// The broker nodes in their configured order: `urls` when set, else
    /// `url` split at commas.
    pub fn nodes(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            self.url.split(',').map(str::trim).collect()
        } else {
            self.urls.iter().map(|u| u.trim()).collect()
        }
    }

    /// The broker user every connection of this process authenticates as
    /// (the first node's; `validate` makes all nodes name the same).
    pub fn user(&self) -> String {
        crate::amqp::user_of(self.nodes().first().copied().unwrap_or_default())
    }

    /// The position in `nodes()` of the node this process last connected to
    /// (0 before any connection).
    pub fn connected_node(&self) -> usize {
        self.last_node.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key the nodes came from, for error messages.
    pub fn nodes_key(&self) -> &'static str {
        if self.urls.is_empty() {
            "amqp.url"
        } else {
            "amqp.urls"
        }
    }

    /// Every node an `amqp://` or `amqps://` URL that parses, all with the
    /// same user and vhost: several nodes are one cluster, and a service
    /// must be the same broker user wherever it connects.
    fn validate_nodes(&self) -> Result<(), ConfigError> {
        let key = self.nodes_key();
        let mut first: Option<(String, String)> = None;
        for node in self.nodes() {
            if !node.starts_with("amqp://") && !node.starts_with("amqps://") {
                return invalid_owned(
                    key.into(),
                    "must be an amqp:// URL, or several separated by commas",
                );
            }
            let uri = node
                .parse::<lapin::uri::AMQPUri>()
                .map_err(|e| ConfigError::Invalid {
                    key: key.into(),
                    message: format!("not a broker URL: {e}"),
                })?;
            let this = (uri.authority.userinfo.username, uri.vhost);
            match &first {
                None => first = Some(this),
                Some(f) if *f != this => {
                    return invalid_owned(
                        key.into(),
                        "every node must name the same user and vhost (the nodes of one cluster)",
                    );
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
    /// Where spans are exported with OTLP over HTTP (JSON), e.g.
    /// `http://127.0.0.1:4318/v1/traces`; empty (the default): not at all.
    /// Each span joins the trace of the request's `traceparent`.
    pub otlp_endpoint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    pub body_limit_bytes: usize,
    /// How long a stored idempotency key answers replays.
    pub idempotency_ttl_secs: u64,
    /// How often expired idempotency keys are purged.
    pub purge_interval_secs: u64,
    pub request_timeout_secs: u64,
    /// `Retry-After` sent with a 503.
    pub retry_after_secs: u64,
    /// API requests processed at once at most; the ones beyond get a 503 at
    /// once, before any database work.
    pub max_in_flight: usize,
    /// Whether the in-flight limit adapts to the latency the admitted
    /// requests see (between `min_in_flight` and `max_in_flight`), or stays
    /// at `max_in_flight`.
    pub adaptive_in_flight: bool,
    /// The adaptive limit's floor (capped at `max_in_flight`).
    pub min_in_flight: usize,
    /// How long a client does not send a whole request head before its
    /// connection is closed (slow clients cannot hold connections).
    pub header_read_timeout_secs: u64,
    /// The largest request head (request line and headers) read; beyond it
    /// the answer is 431.
    pub max_header_bytes: usize,
    /// The longest request URI; beyond it the answer is 414.
    pub max_uri_bytes: usize,
    /// How long a looked-up API key is trusted without asking the database
    /// again: a revocation takes effect within this time (0: every request
    /// looks its key up).
    pub auth_cache_secs: u64,
    /// Bearer authentication of `/v1/*`. Off only to measure what it costs
    /// (`scripts/bench`); then every request acts as client `(anonymous)`
    /// with every scope, and start-up logs a warning. Refused unless
    /// `ingest.listen` is a loopback address.
    pub auth_enabled: bool,
    /// The AMQP request consumer (queue `entrip.ingest`).
    pub amqp: IngestAmqpSettings,
}

/// `[ingest.amqp]`: requests that arrive through the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestAmqpSettings {
    /// Whether `ingest` consumes `entrip.ingest` beside serving HTTP.
    pub enabled: bool,
    /// Unacknowledged requests the broker hands the consumer.
    pub prefetch: u16,
    /// Requests processed at once, each holding a database connection.
    pub concurrency: usize,
    /// Retries (database unavailable) before a request is dead-lettered.
    pub max_retries: u32,
}

impl IngestAmqpSettings {
    pub fn consumer(&self) -> ConsumerSettings {
        ConsumerSettings {
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            max_retries: self.max_retries,
        }
    }
}

impl WorkersSettings {
    pub fn consumer(&self) -> ConsumerSettings {
        ConsumerSettings {
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            max_retries: self.max_retries,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherSettings {
    pub listen: SocketAddr,
    /// Outbox rows claimed and published per batch.
    pub batch_size: u32,
    /// Batches in flight at once, each in its own transaction on its own
    /// channel: one lane's database work overlaps another's publishing.
    pub lanes: u32,
    /// Batches in flight at once across every dispatcher of the database:
    /// a lane that finds them all taken stands by for `poll_interval_ms`.
    /// On one PostgreSQL, lanes beyond what it can serve only contend for
    /// the same rows, so more dispatchers add failover, not contention.
    pub fleet_lanes: u32,
    /// Fallback polling when no NOTIFY arrives.
    pub poll_interval_ms: u64,
    /// How long a batch waits for the broker's confirms.
    pub confirm_timeout_ms: u64,
    /// Failed publishes (nack, return, confirm timeout) before a row is dead.
    pub max_attempts: u32,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Published rows older than this are deleted.
    pub retention_hours: u64,
    pub purge_interval_secs: u64,
    /// How often the outbox gauges are refreshed.
    pub stats_interval_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSettings {
    pub listen: SocketAddr,
    /// Unacknowledged messages the broker hands each consumer (100–300).
    pub prefetch: u16,
    /// Messages a consumer processes at once.
    pub concurrency: usize,
    /// Retries of a transient failure before the message is dead-lettered.
    pub max_retries: u32,
}

/// Webhook subscribers and how they are called.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsSettings {
    pub webhooks: Vec<WebhookSettings>,
    pub timeout_ms: u64,
}

/// One subscriber: where, the signing secret (`whsec_` + base64), and the
/// event types it wants (`*` within a segment, `#` for everything).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: String,
    pub topics: Vec<String>,
}

impl WebhookSettings {
    /// Whether one of its patterns matches the event type `topic`.
    pub fn wants(&self, topic: &str) -> bool {
        self.topics
            .iter()
            .any(|p| crate::amqp::topic_matches(p, topic))
    }
}

/// The periodic integrity checker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegritySettings {
    pub interval_secs: u64,
    /// How long an approved payment may stay unsettled.
    pub settle_grace_secs: u64,
    /// How long an outbox row may stay undelivered.
    pub outbox_max_age_secs: u64,
    /// POSTed the ticket of a run that finds violations (`Report::ticket` in
    /// the workers; docs/operations.md, "An integrity alert").
    pub alert_webhook: Option<String>,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://entrip@127.0.0.1:5432/entrip".into(),
            // Filled in from the environment by `Settings::load`.
            password_file: None,
            password: None,
            max_connections: 16,
            acquire_timeout_ms: 3_000,
            statement_timeout_ms: 30_000,
            startup_timeout_secs: 60,
        }
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            urls: Vec::new(),
            connect_timeout_ms: 5_000,
            last_node: std::sync::Arc::default(),
            delivery_limit: 20,
            retry_delays_ms: vec![1_000, 10_000, 60_000, 300_000],
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info,sqlx=warn".into(),
            otlp_endpoint: String::new(),
        }
    }
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 64 * 1024,
            idempotency_ttl_secs: 24 * 3600,
            purge_interval_secs: 300,
            request_timeout_secs: 30,
            retry_after_secs: 5,
            max_in_flight: 64,
            adaptive_in_flight: true,
            min_in_flight: 4,
            header_read_timeout_secs: 10,
            max_header_bytes: 16 * 1024,
            max_uri_bytes: 8 * 1024,
            auth_cache_secs: 5,
            auth_enabled: true,
            amqp: IngestAmqpSettings::default(),
        }
    }
}

impl Default for IngestAmqpSettings {
    fn default() -> Self {
        // Four prefetched per one in flight: the next ones are at hand
        // without holding many unacknowledged in a consumer that dies.
        Self {
            enabled: true,
            prefetch: 32,
            concurrency: 8,
            max_retries: 8,
        }
    }
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
            batch_size: 2_000,
            lanes: 2,
            fleet_lanes: 2,
            poll_interval_ms: 1_000,
            confirm_timeout_ms: 10_000,
            max_attempts: 10,
            backoff_min_ms: 1_000,
            backoff_max_ms: 300_000,
            retention_hours: 7 * 24,
            purge_interval_secs: 60,
            stats_interval_secs: 5,
        }
    }
}

impl Default for WorkersSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9102)),
            prefetch: 200,
            concurrency: 12,
            max_retries: 8,
        }
    }
}

impl Default for NotificationsSettings {
    fn default() -> Self {
        Self {
            webhooks: Vec::new(),
            timeout_ms: 5_000,
        }
    }
}

impl Default for IntegritySettings {
    fn default() -> Self {
        Self {
            interval_secs: 3600,
            settle_grace_secs: 300,
            outbox_max_age_secs: 900,
            alert_webhook: None,
        }
    }
}

impl Settings {
    /// Loads the settings from the process environment and files.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::vars().collect())
    }

    /// Loads the settings, or stops the binary with one line naming the
    /// key at fault (exit status 2).
    pub fn load_or_exit(binary: &str) -> Self {
        match Self::load() {
            Ok(s) => s,
            Err(err) => {
                eprintln!("{binary}: {err}");
                std::process::exit(2);
            }
        }
    }

    /// Loads the settings from the given environment (tests pass their own).
    fn load_from(env: HashMap<String, String>) -> Result<Self, ConfigError> {
        let defaults = Config::try_from(&Settings::default())?;
        let mut builder = Config::builder()
            .add_source(defaults)
            .add_source(File::new("config/default.toml", FileFormat::Toml).required(false));
        if let Some(path) = env.get("ENTRIP_CONFIG").filter(|p| !p.is_empty()) {
            if !Path::new(path).is_file() {
                return Err(ConfigError::Invalid {
                    key: "ENTRIP_CONFIG".into(),
                    message: format!("file {path} does not exist"),
                });
            }
            builder = builder.add_source(File::new(path, FileFormat::Toml).required(true));
        }
        let entrip_env: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("ENTRIP__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("ENTRIP")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("amqp.retry_delays_ms")
                .with_list_parse_key("amqp.urls")
                .source(Some(entrip_env.into_iter().collect())),
        );
        // The conventional variables apply unless the specific key is set.
        for (var, key, specific) in [
            ("DATABASE_URL", "database.url", "ENTRIP__DATABASE__URL"),
            ("AMQP_URL", "amqp.url", "ENTRIP__AMQP__URL"),
        ] {
            if let Some(v) = env.get(var).filter(|v| !v.is_empty())
                && !env.contains_key(specific)
            {
                builder = builder.set_override(key, v.as_str())?;
            }
        }
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        settings.database.resolve_password(&env)?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| invalid_owned(key.to_owned(), message);
        if !self.database.url.starts_with("postgres://")
            && !self.database.url.starts_with("postgresql://")
        {
            return invalid("database.url", "must be a postgres:// URL");
        }
        self.amqp.validate_nodes()?;
        if self.amqp.connect_timeout_ms == 0 {
            return invalid("amqp.connect_timeout_ms", "must be at least 1");
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        if self.ingest.body_limit_bytes < 1024 {
            return invalid("ingest.body_limit_bytes", "must be at least 1024");
        }
        if self.ingest.idempotency_ttl_secs == 0 {
            return invalid("ingest.idempotency_ttl_secs", "must be at least 1");
        }
        if self.ingest.purge_interval_secs == 0 {
            return invalid("ingest.purge_interval_secs", "must be at least 1");
        }
        // tokio's Semaphore holds at most usize::MAX >> 3 permits; far more
        // than a million requests at once is a typo, not a setting.
        if !(1..=1_000_000).contains(&self.ingest.max_in_flight) {
            return invalid("ingest.max_in_flight", "must be between 1 and 1000000");
        }
        if self.ingest.min_in_flight == 0 {
            return invalid("ingest.min_in_flight", "must be at least 1");
        }
        if !self.ingest.auth_enabled && !self.ingest.listen.ip().is_loopback() {
            return invalid(
                "ingest.auth_enabled",
                "may be false only when ingest.listen is a loopback address",
            );
        }
        if self.ingest.request_timeout_secs == 0 {
            return invalid("ingest.request_timeout_secs", "must be at least 1");
        }
        if self.ingest.header_read_timeout_secs == 0 {
            return invalid("ingest.header_read_timeout_secs", "must be at least 1");
        }
        // hyper reads request heads into a buffer of at least 8 KiB.
        if self.ingest.max_header_bytes < 8192 {
            return invalid("ingest.max_header_bytes", "must be at least 8192");
        }
        if self.ingest.max_uri_bytes < 256 {
            return invalid("ingest.max_uri_bytes", "must be at least 256");
        }
        let ia = &self.ingest.amqp;
        if ia.prefetch == 0 || ia.prefetch > 1000 {
            return invalid("ingest.amqp.prefetch", "must be between 1 and 1000");
        }
        if ia.concurrency == 0
            || ia.concurrency > usize::from(ia.prefetch)
            || ia.concurrency > self.database.max_connections as usize
        {
            return invalid(
                "ingest.amqp.concurrency",
                "must be between 1 and ingest.amqp.prefetch, and at most database.max_connections",
            );
        }
        if self.amqp.delivery_limit == 0 {
            return invalid("amqp.delivery_limit", "must be at least 1");
        }
        if self.amqp.retry_delays_ms.is_empty() || self.amqp.retry_delays_ms.contains(&0) {
            return invalid(
                "amqp.retry_delays_ms",
                "must list at least one delay above 0",
            );
        }
        let d = &self.dispatcher;
        if d.batch_size == 0 || d.batch_size > 10_000 {
            return invalid("dispatcher.batch_size", "must be between 1 and 10000");
        }
        // Each lane holds a connection for its batch; keep room for LISTEN,
        // the gauges and the purge.
        if d.lanes == 0 || d.lanes > 16 || d.lanes + 3 > self.database.max_connections {
            return invalid(
                "dispatcher.lanes",
                "must be between 1 and 16, and at most database.max_connections - 3",
            );
        }
        if d.fleet_lanes == 0 || d.fleet_lanes > 64 {
            return invalid("dispatcher.fleet_lanes", "must be between 1 and 64");
        }
        if d.max_attempts == 0 {
            return invalid("dispatcher.max_attempts", "must be at least 1");
        }
        if d.backoff_min_ms == 0 || d.backoff_max_ms < d.backoff_min_ms {
            return invalid(
                "dispatcher.backoff_max_ms",
                "backoff_min_ms must be above 0 and at most backoff_max_ms",
            );
        }
        if d.poll_interval_ms == 0 || d.confirm_timeout_ms == 0 || d.stats_interval_secs == 0 {
            return invalid(
                "dispatcher.poll_interval_ms",
                "intervals and timeouts must be above 0",
            );
        }
        let w = &self.workers;
        if !(100..=300).contains(&w.prefetch) {
            return invalid("workers.prefetch", "must be between 100 and 300");
        }
        if w.concurrency == 0 || w.concurrency > usize::from(w.prefetch) {
            return invalid(
                "workers.concurrency",
                "must be between 1 and workers.prefetch",
            );
        }
        for (i, hook) in self.notifications.webhooks.iter().enumerate() {
            if !hook.url.starts_with("http://") && !hook.url.starts_with("https://") {
                return invalid_owned(
                    format!("notifications.webhooks[{i}].url"),
                    "must be an http(s) URL",
                );
            }
            if crate::signing::decode_secret(&hook.secret).is_none() {
                return invalid_owned(
                    format!("notifications.webhooks[{i}].secret"),
                    "must be whsec_ followed by base64",
                );
            }
            if hook.topics.is_empty() {
                return invalid_owned(
                    format!("notifications.webhooks[{i}].topics"),
                    "must list at least one pattern",
                );
            }
        }
        if self.integrity.interval_secs == 0 {
            return invalid("integrity.interval_secs", "must be at least 1");
        }
        if self.log.level.trim().is_empty() {
            return invalid("log.level", "must not be empty");
        }
        if !self.log.otlp_endpoint.is_empty()
            && !url::Url::parse(&self.log.otlp_endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        {
            return invalid(
                "log.otlp_endpoint",
                "must be an http:// or https:// URL, or empty to export nothing",
            );
        }
        Ok(())
    }
}

/// The file name of the password `scripts/services` generates for the
/// services' role `entrip`.
pub const PASSWORD_FILE_NAME: &str = "postgres-entrip.password";

/// `$XDG_CONFIG_HOME/entrip/postgres-entrip.password`, else the same under
/// `$HOME/.config`; `None` when neither variable is set (e.g. a process
/// started with a cleared environment).
pub fn default_password_file(env: &HashMap<String, String>) -> Option<PathBuf> {
    let non_empty = |k: &str| env.get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let config_home =
        non_empty("XDG_CONFIG_HOME").or_else(|| non_empty("HOME").map(|h| h.join(".config")))?;
    Some(config_home.join("entrip").join(PASSWORD_FILE_NAME))
}

impl DatabaseSettings {
    /// Fills in `password_file`'s default and, when `url` carries no
    /// password and the file exists, `password` from its trimmed content.
    fn resolve_password(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let file = match self.password_file.take() {
            None => default_password_file(env),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
        };
        self.password_file = file.clone();
        self.password = None;
        let Some(file) = file else {
            return Ok(());
        };
        if url_has_password(&self.url) || !file.exists() {
            return Ok(());
        }
        let bad = |message: String| {
            Err(ConfigError::Invalid {
                key: "database.password_file".into(),
                message,
            })
        };
        match std::fs::read_to_string(&file) {
            Ok(text) if text.trim().is_empty() => bad(format!("{} is empty", file.display())),
            Ok(text) => {
                self.password = Some(Password::new(text.trim()));
                Ok(())
            }
            Err(err) => bad(format!("cannot read {}: {err}", file.display())),
        }
    }
}

/// Whether a `postgres://` URL carries a password (`user:pw@` or
/// `?password=`). One that does not parse is left to the connection to
/// report under `database.url`.
fn url_has_password(url: &str) -> bool {
    url::Url::parse(url)
        .is_ok_and(|u| u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password"))
}

fn invalid_owned(key: String, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        message: message.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_work_without_any_source() {
        let s = Settings::load_from(env(&[])).unwrap();
        assert_eq!(s.ingest.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.dispatcher.listen.to_string(), "127.0.0.1:9101");
        assert_eq!(s.workers.listen.to_string(), "127.0.0.1:9102");
        assert_eq!(s.database.url, "postgres://entrip@127.0.0.1:5432/entrip");
        assert_eq!(s.database.password_file, None, "no HOME, no default file");
        assert_eq!(s.database.password, None);
        assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(s.ingest.body_limit_bytes, 65536);
    }

    #[test]
    fn environment_overrides_and_conventional_urls() {
        let s = Settings::load_from(env(&[
            ("ENTRIP__INGEST__LISTEN", "0.0.0.0:9000"),
            ("ENTRIP__LOG__FORMAT", "json"),
            ("DATABASE_URL", "postgres://u@h/db"),
            ("AMQP_URL", "amqp://x@y/%2f"),
        ]))
        .unwrap();
        assert_eq!(s.ingest.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(s.log.format, LogFormat::Json);
        let s2 =
            Settings::load_from(env(&[("ENTRIP__AMQP__RETRY_DELAYS_MS", "100,2000")])).unwrap();
        assert_eq!(s2.amqp.retry_delays_ms, vec![100, 2000]);
        assert_eq!(s.database.url, "postgres://u@h/db");
        assert_eq!(s.amqp.url, "amqp://x@y/%2f");

        let s = Settings::load_from(env(&[
            ("DATABASE_URL", "postgres://u@h/db"),
            ("ENTRIP__DATABASE__URL", "postgres://specific/db"),
        ]))
        .unwrap();
        assert_eq!(s.database.url, "postgres://specific/db");
    }

    #[test]
    fn several_broker_nodes_from_a_comma_list_or_amqp_urls() {
        let s = Settings::load_from(env(&[(
            "AMQP_URL",
            "amqp://u:p@a:5672/v, amqp://u:p@b:5672/v,amqp://u:p@c:5672/v",
        )]))
        .unwrap();
        assert_eq!(
            s.amqp.nodes(),
            [
                "amqp://u:p@a:5672/v",
                "amqp://u:p@b:5672/v",
                "amqp://u:p@c:5672/v"
            ]
        );
        assert_eq!(s.amqp.user(), "u");
        let s = Settings::load_from(env(&[(
            "ENTRIP__AMQP__URLS",
            "amqp://w@a:1/%2f,amqp://w@b:2/%2f",
        )]))
        .unwrap();
        assert_eq!(s.amqp.nodes(), ["amqp://w@a:1/%2f", "amqp://w@b:2/%2f"]);
        assert_eq!(s.amqp.user(), "w");
        assert_eq!(
            Settings::load_from(env(&[])).unwrap().amqp.nodes(),
            ["amqp://guest:guest@127.0.0.1:5672/%2f"]
        );

        for (var, list, key) in [
            ("AMQP_URL", "amqp://u@a/v,amqp://other@b/v", "amqp.url"),
            ("AMQP_URL", "amqp://u@a/v,amqp://u@b/w", "amqp.url"),
            ("AMQP_URL", "amqp://u@a/v,http://b/", "amqp.url"),
            ("AMQP_URL", "amqp://u@a/v,", "amqp.url"),
            (
                "ENTRIP__AMQP__URLS",
                "amqp://u@a/v,amqp://u@b:notaport/v",
                "amqp.urls",
            ),
        ] {
            let err = Settings::load_from(env(&[(var, list)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{list}: {err}");
        }
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::load_from(env(&[("ENTRIP__INGEST__LISTEN", "not-an-address")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ingest.listen"), "{err}");

        let err = Settings::load_from(env(&[("ENTRIP__INGEST__BODY_LIMIT_BYTES", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ingest.body_limit_bytes"), "{err}");

        let err = Settings::load_from(env(&[("ENTRIP__LOG__FORMAT", "xml")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.format"), "{err}");

        let err = Settings::load_from(env(&[("ENTRIP__LOG__OTLP_ENDPOINT", "localhost:4318")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.otlp_endpoint"), "{err}");
        let s = Settings::load_from(env(&[(
            "ENTRIP__LOG__OTLP_ENDPOINT",
            "http://127.0.0.1:4318/v1/traces",
        )]))
        .unwrap();
        assert_eq!(s.log.otlp_endpoint, "http://127.0.0.1:4318/v1/traces");

        let err = Settings::load_from(env(&[("DATABASE_URL", "mysql://x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("database.url"), "{err}");

        for slots in ["0", "65"] {
            let err = Settings::load_from(env(&[("ENTRIP__DISPATCHER__FLEET_LANES", slots)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("dispatcher.fleet_lanes"), "{slots}: {err}");
        }
    }

    #[test]
    fn webhooks_come_from_the_config_file_and_are_checked() {
        let dir = std::env::temp_dir().join(format!("entrip-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("entrip.toml");
        std::fs::write(
            &file,
            "[[notifications.webhooks]]\nurl = \"http://127.0.0.1:9999/hooks\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\ntopics = [\"booking.*\", \"settlement.recorded\"]\n",
        )
        .unwrap();
        let s = Settings::load_from(env(&[("ENTRIP_CONFIG", file.to_str().unwrap())])).unwrap();
        assert_eq!(s.notifications.webhooks.len(), 1);
        assert_eq!(
            s.notifications.webhooks[0].topics,
            vec!["booking.*", "settlement.recorded"]
        );
        std::fs::write(
            &file,
            "[[notifications.webhooks]]\nurl = \"http://x\"\nsecret = \"nope\"\ntopics = [\"#\"]\n",
        )
        .unwrap();
        let err = Settings::load_from(env(&[("ENTRIP_CONFIG", file.to_str().unwrap())]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("notifications.webhooks[0].secret"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn worker_concurrency_is_bounded_by_the_prefetch_not_the_pool() {
        // No webhook call holds a connection (leases), so a concurrency above
        // the pool only queues for connections.
        assert!(
            Settings::load_from(env(&[
                ("ENTRIP__WORKERS__CONCURRENCY", "40"),
                ("ENTRIP__DATABASE__MAX_CONNECTIONS", "8"),
            ]))
            .is_ok()
        );
        let err = Settings::load_from(env(&[("ENTRIP__WORKERS__CONCURRENCY", "201")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("workers.concurrency"), "{err}");
    }

    #[test]
    fn authentication_is_off_only_on_loopback_and_the_in_flight_limit_is_bounded() {
        let off = ("ENTRIP__INGEST__AUTH_ENABLED", "false");
        let err = Settings::load_from(env(&[off, ("ENTRIP__INGEST__LISTEN", "0.0.0.0:8080")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ingest.auth_enabled"), "{err}");
        assert!(
            Settings::load_from(env(&[off, ("ENTRIP__INGEST__LISTEN", "127.0.0.1:8080")])).is_ok()
        );
        assert!(Settings::load_from(env(&[off, ("ENTRIP__INGEST__LISTEN", "[::1]:8080")])).is_ok());
        for bad in ["0", "18446744073709551615"] {
            let err = Settings::load_from(env(&[("ENTRIP__INGEST__MAX_IN_FLIGHT", bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("ingest.max_in_flight"), "{bad}: {err}");
        }
        let err = Settings::load_from(env(&[("ENTRIP__INGEST__MIN_IN_FLIGHT", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ingest.min_in_flight"), "{err}");
        let fixed = Settings::load_from(env(&[
            ("ENTRIP__INGEST__ADAPTIVE_IN_FLIGHT", "false"),
            ("ENTRIP__INGEST__MIN_IN_FLIGHT", "2"),
        ]))
        .unwrap();
        assert!(!fixed.ingest.adaptive_in_flight);
        assert_eq!(fixed.ingest.min_in_flight, 2);
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let err = Settings::load_from(env(&[("ENTRIP__INGEST__LISTN", "0.0.0.0:1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn a_config_file_is_read_and_a_missing_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("entrip-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("entrip.toml");
        std::fs::write(&file, "[ingest]\nidempotency_ttl_secs = 60\n").unwrap();
        let s = Settings::load_from(env(&[("ENTRIP_CONFIG", file.to_str().unwrap())])).unwrap();
        assert_eq!(s.ingest.idempotency_ttl_secs, 60);
        std::fs::remove_dir_all(&dir).unwrap();

        let err = Settings::load_from(env(&[("ENTRIP_CONFIG", "/nonexistent/entrip.toml")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ENTRIP_CONFIG"), "{err}");
    }

    /// A fresh directory standing in for `$HOME`.
    fn temp_home() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("entrip-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_password_file_defaults_to_the_config_home() {
        let home = temp_home();
        let home_s = home.to_str().unwrap();
        let s = Settings::load_from(env(&[("HOME", home_s)])).unwrap();
        let expected = home.join(".config/entrip/postgres-entrip.password");
        assert_eq!(
            s.database.password_file.as_deref(),
            Some(expected.as_path())
        );
        assert_eq!(s.database.password, None, "a missing file is no error");

        let xdg = home.join("xdg");
        let s = Settings::load_from(env(&[
            ("HOME", home_s),
            ("XDG_CONFIG_HOME", xdg.to_str().unwrap()),
        ]))
        .unwrap();
        assert_eq!(
            s.database.password_file.as_deref(),
            Some(xdg.join("entrip/postgres-entrip.password").as_path())
        );

        let s = Settings::load_from(env(&[
            ("HOME", home_s),
            ("ENTRIP__DATABASE__PASSWORD_FILE", ""),
        ]))
        .unwrap();
        assert_eq!(
            s.database.password_file, None,
            "an empty value turns it off"
        );
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn the_password_comes_from_the_file_unless_the_url_has_one() {
        let home = temp_home();
        let dir = home.join(".config/entrip");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("postgres-entrip.password"), "0123abcd\n").unwrap();
        let home_s = home.to_str().unwrap();
        let s = Settings::load_from(env(&[("HOME", home_s)])).unwrap();
        assert_eq!(
            s.database.password,
            Some(Password::new("0123abcd")),
            "trimmed"
        );
        assert!(!format!("{s:?}").contains("0123abcd"), "Debug hides it");

        for url in [
            "postgres://entrip:secret@127.0.0.1:5432/entrip",
            "postgres://entrip@127.0.0.1:5432/entrip?password=secret",
        ] {
            let s = Settings::load_from(env(&[("HOME", home_s), ("DATABASE_URL", url)])).unwrap();
            assert_eq!(s.database.password, None, "{url}: the URL's password wins");
        }

        let other = home.join("other.password");
        std::fs::write(&other, "  other  ").unwrap();
        let s = Settings::load_from(env(&[
            ("HOME", home_s),
            ("ENTRIP__DATABASE__PASSWORD_FILE", other.to_str().unwrap()),
        ]))
        .unwrap();
        assert_eq!(s.database.password, Some(Password::new("other")));
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn an_unreadable_or_empty_password_file_names_its_key() {
        let home = temp_home();
        // A directory exists but cannot be read as a file, even by root.
        let unreadable = home.join("a-directory");
        std::fs::create_dir_all(&unreadable).unwrap();
        let empty = home.join("empty.password");
        std::fs::write(&empty, "\n").unwrap();
        for file in [&unreadable, &empty] {
            let err = Settings::load_from(env(&[
                ("HOME", home.to_str().unwrap()),
                ("ENTRIP__DATABASE__PASSWORD_FILE", file.to_str().unwrap()),
            ]))
            .unwrap_err()
            .to_string();
            assert!(err.contains("database.password_file"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        std::fs::remove_dir_all(&home).unwrap();
    }
}
