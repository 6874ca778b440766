-- pgbench floor: only what the effect of POST /v1/bookings with a new key
-- needs to leave behind, in one transaction of four statements: the key row
-- with its stored answer, the booking, the audit row and the outbox row (a
-- CloudEvents body of the size ingest writes). Run with -M prepared: the
-- fewest round trips and no parsing, so no implementation of the request
-- can do less work against the database. scripts/bench-ingest reports the
-- ingest rate against this and against bench/booking_tx.sql (every
-- statement the service runs today). Needs one user row. The JSON literals
-- spell ':' as \x3a: with -M prepared, pgbench takes ':false' for a
-- variable.
\set r random(1, 999999999999)
BEGIN;
INSERT INTO idempotency_keys (client, key, method, path, request_hash, expires_at, response_status, response_body)
  VALUES ('bench', 'floor-key-' || :client_id || '-' || :r, 'POST', '/v1/bookings',
          sha256(convert_to(:r::text, 'UTF8')), now() + make_interval(secs => 86400), 201,
          E'{"id"\x3a"0192f0a0-0000-7000-8000-000000000001","code"\x3a"PB-1","status"\x3a"PENDING","userId"\x3a"0192f0a0-0000-7000-8000-000000000002","customerName"\x3a"Bench User","customerPhone"\x3a"+82 10 0000 0000","itineraryFrom"\x3a"ICN","itineraryTo"\x3a"NRT","departAt"\x3a"2026-12-24T09\x3a30\x3a00Z","arriveAt"\x3a"2026-12-24T11\x3a45\x3a00Z","currency"\x3a"KRW","amount"\x3a"350000","requiresApproval"\x3afalse,"createdAt"\x3a"2026-11-26T00\x3a00\x3a00Z"}');
INSERT INTO bookings (id, code, user_id, customer_name, customer_phone, itinerary_from, itinerary_to,
                      depart_at, arrive_at, currency, amount, requires_approval)
  VALUES (gen_random_uuid(), 'PF-' || :client_id || '-' || :r, (SELECT id FROM users ORDER BY id LIMIT 1),
          'Bench User', '+82 10 0000 0000', 'ICN', 'NRT', '2026-12-24T09:30:00Z', '2026-12-24T11:45:00Z',
          'KRW', 350000, false);
INSERT INTO audit_log (actor, action, entity_type, entity_id, detail, idempotency_key, event_id)
  VALUES (E'client\x3abench', 'booking.create', 'booking', gen_random_uuid(), E'{"channel"\x3a"http","client"\x3a"bench"}',
          'floor-key-' || :client_id || '-' || :r, gen_random_uuid());
INSERT INTO outbox (id, aggregate_type, aggregate_id, topic, payload, headers)
  VALUES (gen_random_uuid(), 'booking', gen_random_uuid(), 'booking.created',
          E'{"specversion"\x3a"1.0","id"\x3a"0192f0a0-0000-7000-8000-000000000000","source"\x3a"/entrip/ingest","type"\x3a"booking.created","subject"\x3a"0192f0a0-0000-7000-8000-000000000001","time"\x3a"2026-11-26T00\x3a00\x3a00Z","datacontenttype"\x3a"application/json","data"\x3a{"id"\x3a"0192f0a0-0000-7000-8000-000000000001","code"\x3a"PB-1","status"\x3a"PENDING","userId"\x3a"0192f0a0-0000-7000-8000-000000000002","customerName"\x3a"Bench User","customerPhone"\x3a"+82 10 0000 0000","itineraryFrom"\x3a"ICN","itineraryTo"\x3a"NRT","departAt"\x3a"2026-12-24T09\x3a30\x3a00Z","arriveAt"\x3a"2026-12-24T11\x3a45\x3a00Z","currency"\x3a"KRW","amount"\x3a"350000","requiresApproval"\x3afalse}}',
          E'{"traceparent"\x3a"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}');
COMMIT;
