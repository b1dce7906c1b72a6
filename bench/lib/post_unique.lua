-- bench/lib/post_unique.lua: wrk script for S2, a POST with a new
-- Idempotency-Key on every request: "<BENCH_KEY_PREFIX>-<thread>-<counter>".
-- bench/run passes a prefix unique to each run (time + repetition), so keys
-- never repeat across runs or threads. Path: BENCH_PATH (default /post).
dofile(os.getenv("BENCH_LIB") .. "/common.lua")

local prefix = os.getenv("BENCH_KEY_PREFIX") or tostring(os.time())
local path = os.getenv("BENCH_PATH") or "/post"
local body = '{"sku":"A-1","qty":2,"note":"idemgate benchmark"}'
local counter = 0
local head, tail

-- The request is formatted once with a placeholder key and split around it,
-- so that each request costs one string concatenation: wrk.format on every
-- request cost the load core (which S2 shares with the upstream and Redis)
-- about 0.5 µs more per request (8.3 against 7.5-8.0 µs of wrk CPU).
function init(args)
  local mark = "\0KEY\0"
  local headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. "-" .. (tid or 0) .. "-" .. mark,
  }
  local template = wrk.format("POST", path, headers, body)
  local at = template:find(mark, 1, true)
  head, tail = template:sub(1, at - 1), template:sub(at + #mark)
end

function request()
  counter = counter + 1
  return head .. counter .. tail
end
