-- wrk script: POST the body in $BENCH_BODY_FILE with `Authorization: $BENCH_TOKEN`, and print one
-- machine-readable line at the end (bench/run.py parses it; "status" counts non-2xx/3xx answers).
-- With BENCH_METHOD=GET it GETs the URL as given instead (the sink's long-polls, bench row 8).
wrk.method = os.getenv("BENCH_METHOD") or "POST"
if wrk.method == "POST" then
  local file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.headers["Content-Type"] = "application/json"
end
wrk.headers["Authorization"] = os.getenv("BENCH_TOKEN")

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
