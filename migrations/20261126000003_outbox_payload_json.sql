-- The outbox payload is stored as json, the text as ingest and the workers
-- wrote it, rather than jsonb. The relay reads every payload back as text to
-- publish it: jsonb had to be printed again for each row (about 6 µs of
-- PostgreSQL CPU per row, ~12 ms per batch of 2,000), json is handed out as
-- stored, and the published body is byte for byte the one written.
-- Nothing queries inside payloads on a hot path (json keeps ->, ->>).
ALTER TABLE outbox ALTER COLUMN payload TYPE json USING payload::json;
