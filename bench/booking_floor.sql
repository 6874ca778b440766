-- pgbench floor: only what the effect of POST /v1/bookings with a new key
-- needs to leave behind, in one transaction of four statements: the key row
-- with its stored answer, the booking, the audit row and the outbox row (a
-- CloudEvents body of the size ingest writes). Run with -M prepared: the
-- fewest round trips and no parsing, so no implementation of the request
-- can do less work against the database. scripts/bench-ingest reports the
-- ingest rate against this and against bench/booking_tx.sql (every
-- statement the service runs today). Needs one user row.
\set r random(1, 999999999999)
BEGIN;
INSERT INTO idempotency_keys (client, key, method, path, request_hash, expires_at, response_status, response_body)
  VALUES ('bench', 'floor-key-' || :client_id || '-' || :r, 'POST', '/v1/bookings',
          sha256(convert_to(:r::text, 'UTF8')), now() + make_interval(secs => 86400), 201,
          '{"id":"0192f0a0-0000-7000-8000-000000000001","code":"PB-1","status":"PENDING","userId":"0192f0a0-0000-7000-8000-000000000002","customerName":"Bench User","customerPhone":"+82 10 0000 0000","itineraryFrom":"ICN","itineraryTo":"NRT","departAt":"2026-12-24T09:30:00Z","arriveAt":"2026-12-24T11:45:00Z","currency":"KRW","amount":"350000","requiresApproval":false,"createdAt":"2026-11-26T00:00:00Z"}');
INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from, itinerary_to,
                      depart_at, arrive_at, currency, amount, requires_approval)
  VALUES (gen_random_uuid(), 'PF-' || :client_id || '-' || :r, (SELECT id FROM users ORDER BY id LIMIT 1),
          'Bench User', '+82 10 0000 0000', 'ICN', 'NRT', '2026-12-24T09:30:00Z', '2026-12-24T11:45:00Z',
          'KRW', 350000, false);
INSERT INTO audit_log (actor, action, entity_type, entity_id, detail, idempotency_key, event_id)
  VALUES ('client:bench', 'booking.create', 'booking', gen_random_uuid(), '{"channel":"http","client":"bench"}',
          'floor-key-' || :client_id || '-' || :r, gen_random_uuid());
INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload, headers)
  VALUES (gen_random_uuid(), 'booking', gen_random_uuid(), 'booking.created',
          '{"specversion":"1.0","id":"0192f0a0-0000-7000-8000-000000000000","source":"/entrip/ingest","type":"booking.created","subject":"0192f0a0-0000-7000-8000-000000000001","time":"2026-11-26T00:00:00Z","datacontenttype":"application/json","data":{"id":"0192f0a0-0000-7000-8000-000000000001","code":"PB-1","status":"PENDING","userId":"0192f0a0-0000-7000-8000-000000000002","customerName":"Bench User","customerPhone":"+82 10 0000 0000","itineraryFrom":"ICN","itineraryTo":"NRT","departAt":"2026-12-24T09:30:00Z","arriveAt":"2026-12-24T11:45:00Z","currency":"KRW","amount":"350000","requiresApproval":false}}',
          '{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
COMMIT;
