-- bench/lib/common.lua: shared by the wrk scripts of bench/run.
-- Loaded with dofile() at the top of each script (BENCH_LIB names this
-- directory). It adds two things to a script:
--   * pacing: when BENCH_PACE_MS is set, every connection waits a random
--     0..2*BENCH_PACE_MS ms (mean BENCH_PACE_MS) before each request, so that
--     C connections offer about C / (BENCH_PACE_MS/1000) requests per second
--     whatever the server's speed (used by the latency scenario);
--   * done(): one machine-readable line, "BENCHJSON {...}", with the counts
--     and latency percentiles (microseconds) that bench/lib/benchlib.py reads.

local pace = tonumber(os.getenv("BENCH_PACE_MS") or "")
if pace and pace > 0 then
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  function delay()
    return math.random(0, 2 * pace)
  end
end

-- Each thread gets a number (used in generated keys).
local next_tid = 0
function setup(thread)
  next_tid = next_tid + 1
  thread:set("tid", next_tid)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
