//! The bearer check of `/v1/*`: a route layer ([`authorize`]) that finds the
//! API client behind `Authorization: Bearer <key>`, refuses a missing,
//! unknown or revoked key (401) or one without the route's scope (403),
//! and hands the client to the handler as a request extension (read by the
//! `Caller` extractor).
//!
//! A key costs at most one indexed lookup (`clients::lookup`); a key found
//! is then trusted for `ingest.auth_cache_secs` (5 s by default), so a
//! revocation takes effect within that time. Keys not found are not
//! cached: the cache holds at most one entry per stored key.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderMap, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus::IntCounterVec;
use sqlx::PgPool;

use crate::{
    App,
    clients::{self, ApiKey, Client, Scope, StoredKey, Verdict},
    error::ApiError,
};

/// Why a request was not let in (label `reason` of
/// `entrip_ingest_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Not a key of any client (malformed, unknown prefix, wrong secret).
    Unknown,
    /// A revoked key.
    Revoked,
    /// A valid key without the route's scope.
    Scope(Scope),
}

impl Refused {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refused::Missing => "missing",
            Refused::Unknown => "unknown",
            Refused::Revoked => "revoked",
            Refused::Scope(_) => "scope",
        }
    }
}

/// Finds and checks API keys; one per server.
#[derive(Clone)]
pub(crate) struct Authenticator {
    pool: PgPool,
    ttl: Duration,
    /// False: authentication is switched off (benchmarks only).
    enabled: bool,
    cache: Arc<Mutex<HashMap<String, (Instant, StoredKey)>>>,
    failures: IntCounterVec,
}

/// Stored keys are few; a bound keeps a flood of valid keys (or a bug) from
/// growing the cache without end.
const CACHE_LIMIT: usize = 10_000;

/// The client every request acts as when `ingest.auth_enabled` is false: a
/// name `ClientName::parse` refuses, so that no real client shares its
/// idempotency scope.
const ANONYMOUS: &str = "(anonymous)";

impl Authenticator {
    pub(crate) fn new(pool: PgPool, ttl: Duration, enabled: bool, failures: IntCounterVec) -> Self {
        Self {
            pool,
            ttl,
            enabled,
            cache: Arc::default(),
            failures,
        }
    }

    /// The client that may call a route needing `scope`, or why not.
    pub(crate) async fn check(
        &self,
        headers: &HeaderMap,
        scope: Scope,
    ) -> Result<Client, ApiError> {
        if !self.enabled {
            return Ok(Client {
                name: ANONYMOUS.into(),
                scopes: vec![Scope::All],
            });
        }
        let refused = match self.authenticate(headers).await? {
            Ok(client) if client.allows(scope) => return Ok(client),
            Ok(_) => Refused::Scope(scope),
            Err(refused) => refused,
        };
        self.failures.with_label_values(&[refused.reason()]).inc();
        Err(ApiError::Refused(refused))
    }

    async fn authenticate(&self, headers: &HeaderMap) -> Result<Result<Client, Refused>, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Ok(Err(Refused::Missing));
        };
        let Some(token) = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
        else {
            return Ok(Err(Refused::Missing));
        };
        let Some(key) = ApiKey::parse(token) else {
            return Ok(Err(Refused::Unknown));
        };
        let Some(stored) = self.stored(key.prefix()).await? else {
            return Ok(Err(Refused::Unknown));
        };
        Ok(match stored.judge(&key) {
            Verdict::Valid(client) => Ok(client),
            Verdict::Revoked => Err(Refused::Revoked),
            Verdict::Unknown => Err(Refused::Unknown),
        })
    }

    /// The stored key of `prefix`: from the cache while fresh, else looked up.
    async fn stored(&self, prefix: &str) -> Result<Option<StoredKey>, ApiError> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, stored)) = cache.get(prefix)
            && at.elapsed() < self.ttl
        {
            return Ok(Some(stored.clone()));
        }
        let stored = clients::lookup(&self.pool, prefix).await?;
        if let (Some(found), Ok(mut cache)) = (&stored, self.cache.lock())
            && !self.ttl.is_zero()
        {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(prefix.to_owned(), (Instant::now(), found.clone()));
        }
        Ok(stored)
    }
}

/// The layer state of one route: who checks, and the scope it needs.
#[derive(Clone)]
pub(crate) struct Guard {
    auth: Authenticator,
    scope: Scope,
}

impl Guard {
    /// The state of a route layer that lets in only clients with `scope`
    /// (`middleware::from_fn_with_state(Guard::new(..), authorize)`).
    pub(crate) fn new(app: &App, scope: Scope) -> Self {
        Self {
            auth: app.auth.clone(),
            scope,
        }
    }
}

pub(crate) async fn authorize(
    State(guard): State<Guard>,
    mut req: Request,
    next: Next,
) -> Response {
    match guard.auth.check(req.headers(), guard.scope).await {
        Ok(client) => {
            req.extensions_mut().insert(client);
            next.run(req).await
        }
        Err(err) => err.into_response(),
    }
}
