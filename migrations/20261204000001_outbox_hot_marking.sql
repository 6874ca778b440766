-- HOT-friendly publish marks (docs/decisions.md, "The outbox watermark").
--
-- Marking a row published set `published_at`, which every undelivered-row
-- index named in its predicate: PostgreSQL could never update the row in
-- place, so each mark wrote a new row version and an entry in every index.
-- After this migration no index names `published_at` or `last_error` (the
-- columns the mark sets), the table leaves room on each page for the
-- marked version, and marking is a heap-only (HOT) update.
--
-- The relay then finds undelivered rows from a watermark instead of a
-- partial index: `outbox_watermark.low_seq` is a seq below which every row
-- is published or dead. The dispatcher advances it (dispatcher/src/outbox.rs
-- `advance_watermark`) only past rows no transaction still in flight can
-- add to, and redrive and republish lower it.
SET LOCAL statement_timeout = 0;

-- Every transaction that takes an outbox seq has a transaction id first:
-- the watermark waits for the transactions that may still insert below it
-- to end, by their ids. (A transaction gets its id at its first write; the
-- seq is drawn before the row's write.)
CREATE SEQUENCE outbox_seq_v2 AS bigint;
SELECT setval('outbox_seq_v2', last_value, is_called) FROM outbox_seq_seq;
CREATE FUNCTION entrip_outbox_next_seq() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN nextval('outbox_seq_v2');
END;
$$;
ALTER TABLE outbox ALTER COLUMN seq DROP IDENTITY;
ALTER TABLE outbox ALTER COLUMN seq SET DEFAULT entrip_outbox_next_seq();
ALTER SEQUENCE outbox_seq_v2 OWNED BY outbox.seq;
-- Nothing may choose its own seq (the identity was GENERATED ALWAYS).
CREATE FUNCTION entrip_outbox_seq_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS DISTINCT FROM OLD.seq THEN
        RAISE EXCEPTION 'outbox.seq cannot change';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER outbox_seq_guard BEFORE UPDATE OF seq ON outbox
    FOR EACH ROW EXECUTE FUNCTION entrip_outbox_seq_guard();

DROP INDEX outbox_due_idx;
DROP INDEX outbox_undelivered_seq_idx;
DROP INDEX outbox_pending_aggregate_idx;
DROP INDEX outbox_published_at_idx;
-- The claim's per-aggregate probes, bounded below by the watermark.
CREATE INDEX outbox_aggregate_seq_idx ON outbox (aggregate_id, seq);
-- Room on each page for the published versions of its rows: a batch marks
-- a page's rows in one transaction, so their old versions cannot be pruned
-- before the new ones are written.
ALTER TABLE outbox SET (fillfactor = 50);

CREATE TABLE outbox_watermark (
    only_row      boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- Every row with a lower seq is published or dead.
    low_seq       bigint  NOT NULL,
    -- Where low_seq may move once every transaction up to candidate_xid
    -- has ended (the snapshot that chose it could not see their rows).
    candidate_seq bigint,
    candidate_xid xid8
);
-- The ALTERs above waited for every writer of the outbox: all rows are
-- visible here.
INSERT INTO outbox_watermark (low_seq)
SELECT coalesce((SELECT min(seq) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL),
                (SELECT max(seq) + 1 FROM outbox),
                1);
