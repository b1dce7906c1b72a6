-- bench/lib/get.lua: wrk script for S1 (GET passthrough) and the direct
-- reference. The request is wrk's static one (the URL given on the command
-- line); this script only adds pacing and the BENCHJSON summary.
dofile(os.getenv("BENCH_LIB") .. "/common.lua")
