-- wrk script: POST /v1/bookings with a fresh Idempotency-Key and booking code
-- per request. Arguments: <user id> <run tag>.
local threads = {}
local next_id = 1

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  user = args[1]
  tag = args[2]
  counter = 0
end

function request()
  counter = counter + 1
  local code = string.format("W%s-%d-%d", tag, tid, counter)
  local key = string.format("wrk-%s-%d-%d-padding", tag, tid, counter)
  local body = string.format(
    '{"code":"%s","customerName":"Bench User","customerPhone":"+82 10 0000 0000",' ..
    '"itineraryFrom":"ICN","itineraryTo":"NRT","departAt":"2026-12-24T09:30:00Z",' ..
    '"arriveAt":"2026-12-24T11:45:00Z","amount":"350000","userId":"%s"}', code, user)
  return wrk.format("POST", "/v1/bookings",
    {["Content-Type"] = "application/json", ["Idempotency-Key"] = key}, body)
end

function done(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT requests=%d errors=%d rps=%.1f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    summary.requests, errors, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
