-- wrk script: POST the body in $BENCH_BODY and print one machine-readable line at the end.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or '{"model":"bench","messages":[{"role":"user","content":"Hello"}]}'
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_AUTH") then
  wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"lat_us":{"p50":%d,"p90":%d,"p99":%d,"p99.9":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
