-- bench/lib/post_replay.lua: wrk script for S3, POST replays drawn round-robin
-- from a small set of keys that bench/run completed first:
-- "<BENCH_KEY_PREFIX>-1" .. "<BENCH_KEY_PREFIX>-<BENCH_KEYS>" (default 16).
-- The body and Content-Type are the ones used to prime the keys, so every
-- request matches the stored fingerprint and is answered from the store.
-- The requests are built once in init(), as wrk's SCRIPTING advises.
dofile(os.getenv("BENCH_LIB") .. "/common.lua")

local prefix = os.getenv("BENCH_KEY_PREFIX") or "replay"
local path = os.getenv("BENCH_PATH") or "/post"
local nkeys = tonumber(os.getenv("BENCH_KEYS") or "16")
local body = '{"sku":"A-1","qty":2,"note":"idemgate benchmark"}'
local requests = {}
local i = 0

function init(args)
  for k = 1, nkeys do
    local headers = {
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = prefix .. "-" .. k,
    }
    requests[k] = wrk.format("POST", path, headers, body)
  end
  i = (tid or 0) % nkeys
end

function request()
  i = i % nkeys + 1
  return requests[i]
end
