-- The relay's wake-up and claim path.
--
-- One payload-free NOTIFY per transaction that inserts outbox rows:
-- PostgreSQL folds identical notifications of one transaction into one. It
-- is only a hint; the dispatcher also polls, and PgListener drops what is
-- sent while it reconnects.
CREATE FUNCTION entrip_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('entrip_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION entrip_outbox_notify();

-- Claims walk undelivered rows in commit order.
CREATE INDEX outbox_undelivered_seq_idx ON outbox (seq) WHERE published_at IS NULL AND dead_at IS NULL;
