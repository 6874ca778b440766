-- pgbench baseline: the statements ingest runs for POST /v1/bookings with a
-- new key, without HTTP, JSON or the service in between, in one transaction:
-- the key claim (which also reads an earlier use of the key), the booking
-- (its user checked by the foreign key), the audit and outbox rows in one
-- statement (a CloudEvents body of the size ingest writes) and the stored
-- response, all within the API client 'bench' (the bearer check itself is
-- cached in ingest: no SQL per request). Needs one user row (scripts/bench-ingest creates it first).
\set r random(1, 999999999999)
BEGIN;
WITH claimed AS (
     INSERT INTO idempotency_keys (client, key, method, path, request_hash, expires_at)
     VALUES ('bench', 'pgbench-key-' || :client_id || '-' || :r, 'POST', '/v1/bookings',
             sha256(convert_to(:r::text, 'UTF8')), now() + make_interval(secs => 86400))
     ON CONFLICT (client, key) DO NOTHING
     RETURNING 1)
SELECT true AS claimed, false AS expired, NULL::text AS method, NULL::text AS path,
       NULL::bytea AS request_hash, NULL::smallint AS response_status, NULL::jsonb AS response_body
  FROM claimed
UNION ALL
SELECT false, expires_at <= now(), method, path, request_hash, response_status, response_body
  FROM idempotency_keys
 WHERE client = 'bench' AND key = 'pgbench-key-' || :client_id || '-' || :r AND NOT EXISTS (SELECT 1 FROM claimed);
INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from, itinerary_to,
                      depart_at, arrive_at, currency, amount, requires_approval)
  VALUES (gen_random_uuid(), 'PB-' || :client_id || '-' || :r, (SELECT id FROM users ORDER BY id LIMIT 1),
          'Bench User', '+82 10 0000 0000', 'ICN', 'NRT', '2026-12-24T09:30:00Z', '2026-12-24T11:45:00Z',
          'KRW', 350000, false)
  RETURNING *;
WITH audit AS (
  INSERT INTO audit_log (actor, action, entity_type, entity_id, detail, idempotency_key, event_id)
  VALUES ('client:bench', 'booking.create', 'booking', gen_random_uuid(), '{"channel":"http","client":"bench"}',
          'pgbench-key-' || :client_id || '-' || :r, gen_random_uuid()))
INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload, headers)
  VALUES (gen_random_uuid(), 'booking', gen_random_uuid(), 'booking.created',
          '{"specversion":"1.0","id":"0192f0a0-0000-7000-8000-000000000000","source":"/entrip/ingest","type":"booking.created","subject":"0192f0a0-0000-7000-8000-000000000001","time":"2026-11-26T00:00:00Z","datacontenttype":"application/json","data":{"id":"0192f0a0-0000-7000-8000-000000000001","code":"PB-1","status":"PENDING","userId":"0192f0a0-0000-7000-8000-000000000002","customerName":"Bench User","customerPhone":"+82 10 0000 0000","itineraryFrom":"ICN","itineraryTo":"NRT","departAt":"2026-12-24T09:30:00Z","arriveAt":"2026-12-24T11:45:00Z","currency":"KRW","amount":"350000","requiresApproval":false}}',
          '{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
UPDATE idempotency_keys
   SET response_status = 201,
       response_body = '{"id":"0192f0a0-0000-7000-8000-000000000001","code":"PB-1","status":"PENDING","userId":"0192f0a0-0000-7000-8000-000000000002","customerName":"Bench User","customerPhone":"+82 10 0000 0000","itineraryFrom":"ICN","itineraryTo":"NRT","departAt":"2026-12-24T09:30:00Z","arriveAt":"2026-12-24T11:45:00Z","currency":"KRW","amount":"350000","requiresApproval":false,"createdAt":"2026-11-26T00:00:00Z"}'
 WHERE client = 'bench' AND key = 'pgbench-key-' || :client_id || '-' || :r;
COMMIT;
