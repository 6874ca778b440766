-- API clients: who may call ingest, and with which scopes. One row per key:
-- a client (a name) holds several keys while it rotates (the old key works
-- until it is revoked). Only the SHA-256 of a key's secret is stored; the
-- public prefix finds the row with one indexed lookup. See README "API keys".
CREATE TABLE api_clients (
    id            uuid        PRIMARY KEY,
    name          text        NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    scopes        text[]      NOT NULL CHECK (
        cardinality(scopes) BETWEEN 1 AND 8
        AND scopes <@ ARRAY['users:write', 'bookings:write', 'payments:write', 'payments:result',
                            'approvals:write', 'approvals:decide', 'read', '*']::text[]),
    key_prefix    text        NOT NULL UNIQUE CHECK (key_prefix ~ '^[0-9a-f]{12}$'),
    secret_sha256 bytea       NOT NULL CHECK (length(secret_sha256) = 32),
    -- The broker user whose messages (validated `user_id`) act as this client.
    amqp_user     text        CHECK (length(amqp_user) BETWEEN 1 AND 255),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    CONSTRAINT api_clients_revoked_after_creation CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);
CREATE INDEX api_clients_name_idx ON api_clients (name);
CREATE INDEX api_clients_amqp_user_idx ON api_clients (amqp_user) WHERE amqp_user IS NOT NULL;

-- Idempotency keys are scoped by client: the same key from two clients is
-- two keys. Keys stored before clients existed belong to no client that can
-- authenticate (a name `clients create` refuses): they stay valid rows, are
-- never replayed to anybody, and expire and are purged as before.
ALTER TABLE idempotency_keys
    ADD COLUMN client text NOT NULL DEFAULT '(before-clients)'
        CHECK (length(client) BETWEEN 1 AND 63);
ALTER TABLE idempotency_keys ALTER COLUMN client DROP DEFAULT;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (client, key);
