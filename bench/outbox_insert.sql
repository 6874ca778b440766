-- pgbench: one committed outbox row per transaction, as ingest writes them
-- (used at a fixed rate with -R to measure commit-to-publish latency).
INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload)
VALUES (gen_random_uuid(), 'booking', gen_random_uuid(), 'booking.created',
        '{"specversion":"1.0","type":"booking.created","data":{"n":0}}');
