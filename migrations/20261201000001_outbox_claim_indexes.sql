-- The claim's two probes ("an older row of this aggregate waiting for a
-- retry", "older undelivered rows of this aggregate") must look up
-- outbox_pending_aggregate_idx. In a table never analyzed (a fresh
-- database, the first backlog) with some rows already published, PostgreSQL
-- estimated every partial index as nearly empty and scanned the seq or the
-- retry index in full for each candidate instead: 2.7 s per batch of 200
-- with 4,000 rows waiting, against 6 ms.
--
-- Planner statistics cannot be trusted there, so the choice is taken away
-- from the planner: both indexes now also require `next_attempt_at IS NOT
-- NULL`. Only the candidate scan implies it (its `next_attempt_at <= now()`
-- is a strict comparison); the probes do not, so they can only use the
-- aggregate's index. The column is NOT NULL, so the indexes hold the same
-- rows as before.
--
-- The rebuild scans the whole outbox (published rows too) while it holds
-- the table's lock: writes that enqueue events wait until it commits. It is
-- not bounded by the services' statement timeout, so that a large outbox is
-- rebuilt once rather than cut and retried; on a large installation, purge
-- published rows first (`retention_hours`) to keep the pause short.
SET LOCAL statement_timeout = 0;

DROP INDEX outbox_undelivered_seq_idx;
CREATE INDEX outbox_undelivered_seq_idx ON outbox (seq)
    WHERE published_at IS NULL AND dead_at IS NULL AND next_attempt_at IS NOT NULL;

DROP INDEX outbox_due_idx;
CREATE INDEX outbox_due_idx ON outbox (next_attempt_at, seq)
    WHERE published_at IS NULL AND dead_at IS NULL AND next_attempt_at IS NOT NULL;
