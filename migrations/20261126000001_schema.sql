-- Entrip schema: every table of docs/DESIGN.md, with the constraints that make
-- missing or impossible data unstorable. Money is numeric(18,2), times are
-- timestamptz, history is protected by ON DELETE RESTRICT.

CREATE FUNCTION entrip_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TABLE users (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (name = btrim(name) AND length(name) BETWEEN 1 AND 100),
    email       text        NOT NULL CHECK (email ~ '^[^@[:space:]]+@[^@[:space:]]+$' AND length(email) <= 254),
    phone       text        NOT NULL CHECK (phone ~ '^[0-9 +()-]{7,20}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE bookings (
    id                uuid          PRIMARY KEY,
    code              text          NOT NULL UNIQUE CHECK (code ~ '^[A-Z0-9-]{6,32}$'),
    user_id           uuid          NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    customer_name     text          NOT NULL CHECK (customer_name = btrim(customer_name) AND length(customer_name) BETWEEN 1 AND 100),
    customer_phone    text          NOT NULL CHECK (customer_phone ~ '^[0-9 +()-]{7,20}$'),
    itinerary_from    text          NOT NULL CHECK (itinerary_from = btrim(itinerary_from) AND length(itinerary_from) BETWEEN 1 AND 100),
    itinerary_to      text          NOT NULL CHECK (itinerary_to = btrim(itinerary_to) AND length(itinerary_to) BETWEEN 1 AND 100),
    depart_at         timestamptz   NOT NULL,
    arrive_at         timestamptz   NOT NULL,
    currency          text          NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount            numeric(18,2) NOT NULL CHECK (amount > 0),
    requires_approval boolean       NOT NULL DEFAULT false,
    status            text          NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELED')),
    cancel_reason     text          CHECK (cancel_reason IS NULL OR length(cancel_reason) BETWEEN 1 AND 1000),
    canceled_at       timestamptz,
    confirmed_at      timestamptz,
    created_at        timestamptz   NOT NULL DEFAULT now(),
    updated_at        timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT bookings_arrive_after_depart CHECK (arrive_at > depart_at),
    CONSTRAINT bookings_canceled_has_time CHECK ((status = 'CANCELED') = (canceled_at IS NOT NULL)),
    CONSTRAINT bookings_confirmed_has_time CHECK (status <> 'CONFIRMED' OR confirmed_at IS NOT NULL)
);
CREATE INDEX bookings_user_id_idx ON bookings (user_id);
CREATE INDEX bookings_status_idx ON bookings (status) WHERE status <> 'CANCELED';

CREATE TABLE payments (
    id             uuid          PRIMARY KEY,
    booking_id     uuid          NOT NULL REFERENCES bookings (id) ON DELETE RESTRICT,
    method         text          NOT NULL CHECK (method IN ('CARD', 'BANK_TRANSFER', 'VIRTUAL_ACCOUNT', 'MOBILE', 'POINTS')),
    amount         numeric(18,2) NOT NULL CHECK (amount > 0),
    tax            numeric(18,2) NOT NULL CHECK (tax >= 0),
    currency       text          NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status         text          NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'APPROVED', 'FAILED')),
    approval_id    text          CHECK (approval_id IS NULL OR length(approval_id) BETWEEN 1 AND 100),
    failure_reason text          CHECK (failure_reason IS NULL OR length(failure_reason) BETWEEN 1 AND 1000),
    decided_at     timestamptz,
    created_at     timestamptz   NOT NULL DEFAULT now(),
    updated_at     timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT payments_tax_within_amount CHECK (tax <= amount),
    CONSTRAINT payments_approved_has_approval_id CHECK (status <> 'APPROVED' OR approval_id IS NOT NULL),
    CONSTRAINT payments_decided_has_time CHECK ((status = 'PENDING') = (decided_at IS NULL))
);
-- At most one live (not FAILED) payment per booking; a failed one may be retried.
CREATE UNIQUE INDEX payments_one_live_per_booking ON payments (booking_id) WHERE status <> 'FAILED';
CREATE INDEX payments_booking_id_idx ON payments (booking_id, created_at);

CREATE TABLE approvals (
    id           uuid        PRIMARY KEY,
    booking_id   uuid        NOT NULL REFERENCES bookings (id) ON DELETE RESTRICT,
    requester_id uuid        NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    title        text        NOT NULL CHECK (title = btrim(title) AND length(title) BETWEEN 1 AND 200),
    reason       text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
    steps        smallint    NOT NULL DEFAULT 1 CHECK (steps BETWEEN 1 AND 5),
    current_step smallint    NOT NULL DEFAULT 1,
    status       text        NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'APPROVED', 'REJECTED')),
    decided_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT approvals_current_step_range CHECK (current_step BETWEEN 1 AND steps),
    CONSTRAINT approvals_decided_has_time CHECK ((status = 'PENDING') = (decided_at IS NULL))
);
-- At most one live (not REJECTED) approval per booking.
CREATE UNIQUE INDEX approvals_one_live_per_booking ON approvals (booking_id) WHERE status <> 'REJECTED';
CREATE INDEX approvals_booking_id_idx ON approvals (booking_id, created_at);
CREATE INDEX approvals_requester_id_idx ON approvals (requester_id);

-- One row per decision of a multi-step approval: one decision per step, and
-- an approver decides at most once per approval.
CREATE TABLE approval_decisions (
    approval_id uuid        NOT NULL REFERENCES approvals (id) ON DELETE RESTRICT,
    step        smallint    NOT NULL CHECK (step BETWEEN 1 AND 5),
    approver_id uuid        NOT NULL REFERENCES users (id) ON DELETE RESTRICT,
    decision    text        NOT NULL CHECK (decision IN ('APPROVED', 'REJECTED')),
    reason      text        CHECK (reason IS NULL OR length(reason) BETWEEN 1 AND 1000),
    decided_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (approval_id, step),
    CONSTRAINT approval_decisions_one_per_approver UNIQUE (approval_id, approver_id)
);
CREATE INDEX approval_decisions_approver_id_idx ON approval_decisions (approver_id);

CREATE TABLE settlements (
    id          uuid          PRIMARY KEY,
    booking_id  uuid          NOT NULL UNIQUE REFERENCES bookings (id) ON DELETE RESTRICT,
    payment_id  uuid          NOT NULL UNIQUE REFERENCES payments (id) ON DELETE RESTRICT,
    approval_id uuid          REFERENCES approvals (id) ON DELETE RESTRICT,
    gross       numeric(18,2) NOT NULL CHECK (gross > 0),
    tax         numeric(18,2) NOT NULL CHECK (tax >= 0),
    net         numeric(18,2) NOT NULL CHECK (net >= 0),
    currency    text          NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    settled_at  timestamptz   NOT NULL DEFAULT now(),
    created_at  timestamptz   NOT NULL DEFAULT now(),
    updated_at  timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT settlements_net_is_gross_minus_tax CHECK (net = gross - tax)
);

CREATE TABLE audit_log (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    actor           text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action          text        NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    entity_type     text        NOT NULL CHECK (entity_type IN ('user', 'booking', 'payment', 'approval', 'settlement')),
    entity_id       uuid        NOT NULL,
    detail          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key text,
    event_id        uuid
);
CREATE INDEX audit_log_entity_idx ON audit_log (entity_type, entity_id, id);

CREATE TABLE outbox (
    id              uuid        PRIMARY KEY,
    -- Commit order per aggregate: writers lock the aggregate row first, so a
    -- later seq of the same aggregate is always a later commit.
    seq             bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    aggregate_type  text        NOT NULL CHECK (aggregate_type IN ('user', 'booking', 'payment', 'approval', 'settlement')),
    aggregate_id    uuid        NOT NULL,
    topic           text        NOT NULL CHECK (topic IN (
                        'user.created', 'booking.created', 'booking.confirmed', 'booking.canceled',
                        'payment.requested', 'payment.approved', 'payment.failed',
                        'approval.requested', 'approval.decided', 'settlement.recorded')),
    payload         jsonb       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    published_at    timestamptz,
    dead_at         timestamptz,
    CONSTRAINT outbox_not_both_published_and_dead CHECK (published_at IS NULL OR dead_at IS NULL)
);
-- The relay's claim: due, undelivered rows in commit order.
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at, seq) WHERE published_at IS NULL AND dead_at IS NULL;
-- "Does this aggregate have an older undelivered row?"
CREATE INDEX outbox_pending_aggregate_idx ON outbox (aggregate_id, seq) WHERE published_at IS NULL AND dead_at IS NULL;
-- Retention purge of published rows.
CREATE INDEX outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX outbox_dead_idx ON outbox (dead_at) WHERE dead_at IS NOT NULL;

CREATE TABLE idempotency_keys (
    key             text        PRIMARY KEY CHECK (key ~ '^[!-~]{16,255}$'),
    method          text        NOT NULL,
    path            text        NOT NULL,
    request_hash    bytea       NOT NULL CHECK (length(request_hash) = 32),
    response_status smallint    CHECK (response_status BETWEEN 100 AND 599),
    response_body   jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_expiry_after_creation CHECK (expires_at > created_at),
    CONSTRAINT idempotency_keys_response_complete CHECK ((response_status IS NULL) = (response_body IS NULL))
);
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);

CREATE TABLE inbox (
    consumer     text        NOT NULL CHECK (length(consumer) BETWEEN 1 AND 100),
    message_id   text        NOT NULL CHECK (length(message_id) BETWEEN 1 AND 255),
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_processed_at_idx ON inbox (processed_at);

CREATE TABLE notification_deliveries (
    id               uuid        PRIMARY KEY,
    event_id         uuid        NOT NULL,
    subscriber       text        NOT NULL CHECK (length(subscriber) BETWEEN 1 AND 2000),
    topic            text        NOT NULL,
    status           text        NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DELIVERED', 'DEAD')),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_status_code smallint,
    last_error       text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT notification_deliveries_once UNIQUE (event_id, subscriber),
    CONSTRAINT notification_deliveries_delivered_has_time CHECK ((status = 'DELIVERED') = (delivered_at IS NOT NULL))
);
CREATE INDEX notification_deliveries_undelivered_idx ON notification_deliveries (status) WHERE status <> 'DELIVERED';

CREATE TRIGGER users_updated_at BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION entrip_set_updated_at();
CREATE TRIGGER bookings_updated_at BEFORE UPDATE ON bookings FOR EACH ROW EXECUTE FUNCTION entrip_set_updated_at();
CREATE TRIGGER payments_updated_at BEFORE UPDATE ON payments FOR EACH ROW EXECUTE FUNCTION entrip_set_updated_at();
CREATE TRIGGER approvals_updated_at BEFORE UPDATE ON approvals FOR EACH ROW EXECUTE FUNCTION entrip_set_updated_at();
CREATE TRIGGER settlements_updated_at BEFORE UPDATE ON settlements FOR EACH ROW EXECUTE FUNCTION entrip_set_updated_at();
CREATE TRIGGER notification_deliveries_updated_at BEFORE UPDATE ON notification_deliveries FOR EACH ROW EXECUTE FUNCTION entrip_set_updated_at();
