//! Running a command exactly once per idempotency key of its client: claim the key, run
//! the effect, store the response, commit — one transaction. A key used
//! before answers with its stored response (or a misuse error) instead.

use std::time::Duration;

use entrip_common::domain::IdempotencyKey;
use sqlx::PgPool;

use crate::{
    commands::{self, Command, CommandError, Context},
    idempotency::{self, Claim, Fingerprint, StoredResponse},
};

/// The answer to a submitted command.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) status: u16,
    pub(crate) body: serde_json::Value,
    /// True when the answer was stored by an earlier request with the key.
    pub(crate) replayed: bool,
}

/// Runs `command` unless `key` was used before; see the module comment.
pub(crate) async fn submit(
    pool: &PgPool,
    ttl: Duration,
    key: &IdempotencyKey,
    fingerprint: &Fingerprint,
    command: Command,
    ctx: &Context,
) -> Result<Outcome, CommandError> {
    let mut command = Some(command);
    for _ in 0..3 {
        let mut tx = pool.begin().await?;
        match idempotency::claim(&mut tx, &ctx.client, key, fingerprint, ttl).await? {
            Claim::Claimed => {
                let Some(command) = command.take() else {
                    break;
                };
                let reply = commands::execute(&mut tx, command, ctx).await?;
                let stored = StoredResponse {
                    status: reply.status,
                    body: serde_json::to_value(&reply.body).map_err(CommandError::Render)?,
                };
                idempotency::complete(&mut tx, &ctx.client, key, &stored).await?;
                tx.commit().await?;
                return Ok(Outcome {
                    status: reply.status,
                    body: stored.body,
                    replayed: false,
                });
            }
            Claim::Retry => continue,
            Claim::Replay(stored) => {
                tracing::info!(idempotency_key = %key, "replaying the stored response");
                return Ok(Outcome {
                    status: stored.status,
                    body: stored.body,
                    replayed: true,
                });
            }
            Claim::Mismatch(detail) => {
                return Err(CommandError::IdempotencyMisuse(detail.to_owned()));
            }
        }
    }
    Err(CommandError::Contended)
}
