-- pgbench baseline: the same statements ingest runs for POST /v1/bookings,
-- in one transaction, without HTTP, JSON or the service in between.
\set r random(1, 999999999999)
BEGIN;
INSERT INTO idempotency_keys (key, method, path, request_hash, expires_at)
  VALUES ('pgbench-key-' || :client_id || '-' || :r, 'POST', '/v1/bookings',
          sha256(convert_to(:r::text, 'UTF8')), now() + interval '1 day')
  ON CONFLICT (key) DO NOTHING;
SELECT id FROM users WHERE id = (SELECT id FROM users ORDER BY id LIMIT 1) FOR KEY SHARE;
INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from, itinerary_to,
                      depart_at, arrive_at, currency, amount, requires_approval)
  VALUES (gen_random_uuid(), 'PB-' || :client_id || '-' || :r, (SELECT id FROM users ORDER BY id LIMIT 1),
          'Bench User', '+82 10 0000 0000', 'ICN', 'NRT', '2026-12-24T09:30:00Z', '2026-12-24T11:45:00Z',
          'KRW', 350000, false);
INSERT INTO audit_log (actor, action, entity_type, entity_id, detail, idempotency_key, event_id)
  VALUES ('http:upstream', 'booking.create', 'booking', gen_random_uuid(), '{"channel":"http"}',
          'pgbench-key-' || :client_id || '-' || :r, gen_random_uuid());
INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload, headers)
  VALUES (gen_random_uuid(), 'booking', gen_random_uuid(), 'booking.created',
          '{"specversion":"1.0","type":"booking.created","data":{"code":"x"}}', '{}');
UPDATE idempotency_keys SET response_status = 201, response_body = '{"status":"PENDING"}'
  WHERE key = 'pgbench-key-' || :client_id || '-' || :r;
COMMIT;
