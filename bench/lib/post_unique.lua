-- bench/lib/post_unique.lua: wrk script for S2, a POST with a new
-- Idempotency-Key on every request: "<BENCH_KEY_PREFIX>-<thread>-<counter>".
-- bench/run passes a prefix unique to each run (time + repetition), so keys
-- never repeat across runs or threads. Path: BENCH_PATH (default /post).
dofile(os.getenv("BENCH_LIB") .. "/common.lua")

local prefix = os.getenv("BENCH_KEY_PREFIX") or tostring(os.time())
local path = os.getenv("BENCH_PATH") or "/post"
local body = '{"sku":"A-1","qty":2,"note":"idemgate benchmark"}'
local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function request()
  counter = counter + 1
  headers["Idempotency-Key"] = prefix .. "-" .. (tid or 0) .. "-" .. counter
  return wrk.format("POST", path, headers, body)
end
