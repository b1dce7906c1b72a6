#!/usr/bin/env python3
"""bench/lib/benchlib.py: helpers of bench/run and bench/profile (Python 3 stdlib only).

Subcommands:
  free-ports N              print N distinct free TCP ports on 127.0.0.1
  wait-http URL [SECONDS]   wait until URL answers any HTTP response
  snap PID...               JSON snapshot: time, CPU seconds (utime+stime, all
                            threads) and RSS of each PID, and /proc/stat per core
  rss PID                   "VmRSS_kB VmHWM_kB" of a process
  mem-record ...            append one memory reading (VmRSS, VmHWM; Redis keys) to --raw
  record ...                merge one wrk run (its BENCHJSON line) with the CPU
                            snapshots taken around it; append a JSON line to --raw
  s4-record ...             append one S4 result to --raw
  report ...                aggregate the raw JSON lines into the markdown and
                            JSON result files (medians, spreads, ratios, targets)
"""

import json
import os
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# small process and system readings


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_http(url, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is up
        except OSError:
            time.sleep(0.05)
    return False


def proc_cpu_seconds(pid):
    """(utime, stime) of a whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # the command name is in parentheses and may contain spaces
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_status(pid, with_switches=False):
    """VmRSS and VmHWM in kB (and the main thread's voluntary context switches)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "voluntary_ctxt_switches:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    if with_switches:
        return out.get("VmRSS", 0), out.get("VmHWM", 0), out.get("voluntary_ctxt_switches", 0)
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


def per_core_ticks():
    """{core: (busy ticks, total ticks)} from /proc/stat."""
    cores = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                v = [int(x) for x in values]
                idle = v[3] + v[4]  # idle + iowait
                total = sum(v[:8])  # user..steal (guest is inside user)
                cores[name[3:]] = (total - idle, total, v[7], v[5] + v[6])
    return cores


def snap(pids):
    procs = {}
    for pid in pids:
        try:
            rss, hwm, vcsw = proc_status(pid, with_switches=True)
            user, sys_ = proc_cpu_seconds(pid)
            procs[pid] = {"user_s": user, "sys_s": sys_, "rss_kb": rss, "hwm_kb": hwm, "vcsw": vcsw}
        except OSError:
            procs[pid] = None
    return {"time": time.time(), "procs": procs, "cores": per_core_ticks()}


# --------------------------------------------------------------------------
# one run


def parse_wrk(path):
    with open(path) as f:
        text = f.read()
    for line in text.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON ") :]), text
    raise SystemExit(f"no BENCHJSON line in {path}:\n{text}")


def cpu_delta(before, after, pids, kinds=("user_s", "sys_s")):
    total = 0.0
    for pid in pids:
        a, b = after["procs"].get(pid), before["procs"].get(pid)
        if a and b:
            total += sum(a[k] - b[k] for k in kinds)
    return total


def core_busy(before, after):
    out = {}
    for core, (busy, total, steal, irq) in after["cores"].items():
        b = before["cores"].get(core)
        if b and total > b[1]:
            out[core] = {
                "busy": round((busy - b[0]) / (total - b[1]), 3),
                "steal": round((steal - b[2]) / (total - b[1]), 3),
                "irq": round((irq - b[3]) / (total - b[1]), 3),  # irq + softirq
            }
    return out


def opts(argv):
    """--name value pairs into a dict (repeatable --meta k=v)."""
    out, meta = {}, {}
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg}")
        value = next(it)
        if arg == "--meta":
            k, v = value.split("=", 1)
            meta[k] = v
        else:
            out[arg[2:].replace("-", "_")] = value
    out["meta"] = meta
    return out


def record(argv):
    o = opts(argv)
    wrk, _ = parse_wrk(o["wrk"])
    with open(o["before"]) as f:
        before = json.load(f)
    with open(o["after"]) as f:
        after = json.load(f)
    proxy_pids = o.get("proxy_pids", "").split()
    aux_pids = o.get("aux_pids", "").split()
    store_pids = o.get("store_pids", "").split()
    wall = after["time"] - before["time"]
    duration = wrk["duration_us"] / 1e6
    requests = wrk["requests"]
    proxy_cpu = cpu_delta(before, after, proxy_pids)
    proxy_user = cpu_delta(before, after, proxy_pids, ("user_s",))
    aux_sleeps = cpu_delta(before, after, aux_pids, ("vcsw",))
    aux_cpu = cpu_delta(before, after, aux_pids)
    store_cpu = cpu_delta(before, after, store_pids)
    rss = sum((after["procs"].get(p) or {}).get("rss_kb", 0) for p in proxy_pids)
    errors = sum(wrk["errors"].values())
    row = {
        "scenario": o["scenario"],
        "target": o["target"],
        "rep": int(o["rep"]),
        "connections": int(o["connections"]),
        "pace_ms": float(o.get("pace_ms", 0)),
        "requests": requests,
        "duration_s": round(duration, 3),
        "rps": round(requests / duration, 1) if duration else 0,
        "errors": wrk["errors"],
        "error_count": errors,
        "latency_us": wrk["latency_us"],
        "proxy_cpu_s": round(proxy_cpu, 3),
        "proxy_busy": round(proxy_cpu / wall, 3) if wall else None,
        "cpu_s_per_1k": round(proxy_cpu / requests * 1000, 5) if requests else None,
        "user_us_per_req": round(proxy_user / requests * 1e6, 2) if requests else None,
        "sys_us_per_req": round((proxy_cpu - proxy_user) / requests * 1e6, 2) if requests else None,
        "aux_cpu_s": round(aux_cpu, 3),
        "aux_us_per_req": round(aux_cpu / requests * 1e6, 2) if requests else None,
        # redis-server's CPU (part of aux) per request, in the Redis runs
        "store_us_per_req": round(store_cpu / requests * 1e6, 2) if requests and store_pids else None,
        # how often the upstream (and redis) went to sleep and had to be woken
        "aux_sleeps_per_req": round(aux_sleeps / requests, 3) if requests else None,
        "proxy_rss_kb_after": rss,
        "cores": core_busy(before, after),
        **o["meta"],
    }
    with open(o["raw"], "a") as f:
        f.write(json.dumps(row) + "\n")
    c = row["cores"]
    cores = " ".join(f"cpu{k} {v['busy']:.0%}" for k, v in sorted(c.items()))
    lat = row["latency_us"]
    print(
        f"  {row['scenario']:<8} {row['target']:<13} rep {row['rep']}: "
        f"{row['rps']:>9.0f} req/s  p50 {lat['p50'] / 1000:.2f} ms  p99 {lat['p99'] / 1000:.2f} ms  "
        f"proxy {row['proxy_busy']:.0%} of a core, {row['cpu_s_per_1k'] or 0:.4f} cpu-s/1k  "
        f"[{cores}]" + (f"  ERRORS {wrk['errors']}" if errors else ""),
        flush=True,
    )


def s4_record(argv):
    o = opts(argv)
    with open(o["client"]) as f:
        client = json.loads(f.read().strip().splitlines()[-1])
    row = {
        "scenario": "S4",
        "target": o["target"],
        "mode": o["mode"],
        "rep": int(o["rep"]),
        "executions": int(o["executions"]),
        **client,
    }
    with open(o["raw"], "a") as f:
        f.write(json.dumps(row) + "\n")
    print(
        f"  S4       {row['target']:<13} {row['mode']:<6} rep {row['rep']}: "
        f"{row['executions']} execution(s), {row['answered']}/{row['clients']} answered: "
        f"{row['answers']}" + (f"  ERRORS {row['errors']}" if row["errors"] else ""),
        flush=True,
    )


def mem_record(argv):
    o = opts(argv)
    pids = o["pids"].split()
    rss = hwm = 0
    for pid in pids:
        r, h = proc_status(pid)
        rss, hwm = rss + r, hwm + h
    row = {"scenario": "MEM", "target": o["target"], "rep": int(o["rep"]), "when": o["when"],
           "rss_kb": rss, "hwm_kb": hwm}
    if "redis_port" in o:
        import subprocess
        cli = ["redis-cli", "-p", o["redis_port"]]
        row["keys"] = int(subprocess.check_output(cli + ["dbsize"], text=True).strip())
        info = subprocess.check_output(cli + ["info", "memory"], text=True)
        row["used_memory"] = int(next(l.split(":")[1] for l in info.splitlines() if l.startswith("used_memory:")))
    with open(o["raw"], "a") as f:
        f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------
# the report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    """(max - min) / median, as a fraction."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2 or not med(xs):
        return 0.0
    return (max(xs) - min(xs)) / med(xs)


def fmt(x, digits=0, unit=""):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}{unit}"


def report(argv):
    o = opts(argv)
    rows = [json.loads(line) for line in open(o["raw"]) if line.strip()]
    rows = [r for r in rows if r["rep"] > 0]  # rep 0 is the warm-up
    with open(o["meta_file"]) as f:
        meta = json.load(f)

    def runs(scenario, target):
        return sorted(
            (r for r in rows if r["scenario"] == scenario and r["target"] == target),
            key=lambda r: r["rep"],
        )

    def by_rep(scenario, target, field):
        return {r["rep"]: r[field] for r in runs(scenario, target)}

    # ---- throughput scenarios
    throughput = [
        ("S1", "direct", "GET /get straight to the upstream (no proxy; for scale)"),
        ("S1", "nginx", "GET passthrough, nginx"),
        ("S1", "idemgate-mem", "GET passthrough, idemgate (idempotency: off)"),
        ("S2", "idemgate-mem", "POST, new key per request, memory store"),
        ("S2", "idemgate-redis", "POST, new key per request, Redis store"),
        ("S3", "idemgate-mem", "POST replays of 16 completed keys, memory"),
        ("S3", "idemgate-redis", "POST replays of 16 completed keys, Redis"),
    ]
    nginx_rps = by_rep("S1", "nginx", "rps")
    nginx_cpu = by_rep("S1", "nginx", "cpu_s_per_1k")
    summary = {"throughput": [], "latency": [], "s4": [], "memory": {}, "targets": []}
    md = []
    md.append(f"# idemgate benchmark — {meta['timestamp']}\n")
    md.append(
        f"Machine: {meta['cpu_model']}, {meta['nproc']} cores, kernel {meta['kernel']}; "
        f"load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end', '?')}. "
        f"idemgate {meta['git']}; {meta['nginx']}; {meta['wrk']}; {meta['redis']}.\n"
    )
    if meta.get("build"):
        md.append(f"idemgate built: {meta['build']}.\n")
    if meta.get("label"):
        md.append(f"Build: {meta['label']}\n")
    md.append(
        f"Proxy (idemgate or nginx) pinned to core {meta['proxy_cpu']}; wrk, the upstream "
        f"(`bench_upstream`, one thread) and the helper scripts pinned to core "
        f"{meta['load_cpu']}; redis-server to core {meta.get('store_cpu', meta['load_cpu'])}. "
        f"wrk: 1 thread, {meta['connections']} connections, "
        f"{meta['duration']} s per run after a {meta['warmup']} s warm-up of every target; "
        f"{meta['reps']} interleaved repetitions, median reported; spread = (max − min) / median "
        f"across repetitions. Ratios are computed per repetition (runs seconds apart) and "
        f"their median is shown.\n"
    )
    md.append("## Throughput\n")
    md.append(
        "| scenario | req/s (median) | spread | vs nginx S1 | proxy core busy | "
        "CPU-s per 1k req | p50 / p99 at full load (ms) | errors |"
    )
    md.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario, target, label in throughput:
        rs = runs(scenario, target)
        if not rs:
            continue
        rps = [r["rps"] for r in rs]
        ratios = [
            r["rps"] / nginx_rps[r["rep"]] for r in rs if nginx_rps.get(r["rep"])
        ]
        entry = {
            "scenario": scenario,
            "target": target,
            "label": label,
            "rps_median": med(rps),
            "rps_reps": rps,
            "rps_spread": round(spread(rps), 3),
            "ratio_vs_nginx_s1_median": med(ratios),
            "ratio_vs_nginx_s1_reps": [round(x, 3) for x in ratios],
            "proxy_busy_median": med([r["proxy_busy"] for r in rs]),
            "cpu_s_per_1k_median": med([r["cpu_s_per_1k"] for r in rs]),
            "cpu_s_per_1k_reps": [r["cpu_s_per_1k"] for r in rs],
            "p50_ms_median": med([r["latency_us"]["p50"] / 1000 for r in rs]),
            "p99_ms_median": med([r["latency_us"]["p99"] / 1000 for r in rs]),
            "errors": sum(r["error_count"] for r in rs),
        }
        summary["throughput"].append(entry)
        busy = entry["proxy_busy_median"]
        md.append(
            f"| {scenario} {label} | {fmt(entry['rps_median'])} | {entry['rps_spread']:.0%} | "
            f"{fmt(entry['ratio_vs_nginx_s1_median'], 2, '×')} | "
            f"{'–' if target == 'direct' else fmt(busy * 100 if busy is not None else None, 0, '%')} | "
            f"{'–' if target == 'direct' else fmt(entry['cpu_s_per_1k_median'], 4)} | "
            f"{fmt(entry['p50_ms_median'], 2)} / {fmt(entry['p99_ms_median'], 2)} | {entry['errors']} |"
        )
    md.append("")
    md.append("Per repetition (req/s):\n")
    md.append("| scenario | " + " | ".join(f"rep {i}" for i in range(1, int(meta["reps"]) + 1)) + " |")
    md.append("|---|" + "---:|" * int(meta["reps"]))
    for e in summary["throughput"]:
        md.append(
            f"| {e['scenario']} {e['target']} | " + " | ".join(fmt(x) for x in e["rps_reps"]) + " |"
        )
    md.append("")

    # ---- what one request costs each core, and the proxy core's capacity
    md.append("## CPU per request on each core, and the proxy core's capacity\n")
    md.append(
        "CPU time per request of the proxy (core "
        f"{meta['proxy_cpu']}) and of the processes on the load side (the upstream, and "
        "redis-server in the Redis runs; wrk is not counted), from /proc/PID/stat around each "
        "run. When the load core is the bottleneck (proxy core below ~95% busy) req/s "
        "measures the load side; the proxy core's capacity, 1 / (proxy CPU per request), is "
        "what one proxy core could serve, and its ratio to nginx's (nginx S1 CPU per "
        "request / this scenario's, per repetition) is what the throughput ratio would be "
        "if the load side kept up. It is conservative: CPU per request falls as a core gets "
        "busier (more requests per wake-up).\n"
    )
    md.append(
        "| scenario | proxy µs/req | proxy core busy | load core busy | upstream (+ redis) µs/req | "
        "of which redis-server | proxy core capacity (req/s) | vs nginx S1 (CPU ratio) |"
    )
    md.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario, target, label in throughput:
        rs = runs(scenario, target)
        if not rs or target == "direct":
            continue
        ratios = [
            nginx_cpu[r["rep"]] / r["cpu_s_per_1k"]
            for r in rs
            if nginx_cpu.get(r["rep"]) and r["cpu_s_per_1k"]
        ]
        cpu_us = med([r["cpu_s_per_1k"] * 1000 for r in rs if r["cpu_s_per_1k"]])
        load_busy = med([
            r["cores"][str(meta["load_cpu"])]["busy"] for r in rs if str(meta["load_cpu"]) in r["cores"]
        ])
        entry = next(e for e in summary["throughput"] if e["scenario"] == scenario and e["target"] == target)
        entry.update({
            "proxy_us_per_req_median": cpu_us,
            "load_busy_median": load_busy,
            "aux_us_per_req_median": med([r.get("aux_us_per_req") for r in rs]),
            "store_us_per_req_median": med([r.get("store_us_per_req") for r in rs]),
            "capacity_rps": round(1e6 / cpu_us) if cpu_us else None,
            "capacity_vs_nginx_s1_median": med(ratios),
            "capacity_vs_nginx_s1_reps": [round(x, 3) for x in ratios],
        })
        md.append(
            f"| {scenario} {target} | {fmt(cpu_us, 1)} | {fmt(entry['proxy_busy_median'] * 100, 0, '%')} | "
            f"{fmt(load_busy * 100 if load_busy is not None else None, 0, '%')} | "
            f"{fmt(entry['aux_us_per_req_median'], 1)} | {fmt(entry['store_us_per_req_median'], 1)} | "
            f"{fmt(entry['capacity_rps'])} | {fmt(entry['capacity_vs_nginx_s1_median'], 2, '×')} |"
        )
    md.append("")

    # ---- S1 CPU per request: at saturation and at equal (paced) load
    md.append("## S1 CPU per request: nginx vs idemgate\n")
    md.append(
        "utime and stime of the proxy process(es) from /proc/PID/stat around each run, per "
        "request. At saturation each proxy runs at its own peak; in the paced latency runs "
        "both get the same offered rate, which removes the feedback of throughput on kernel "
        "time (a peer that sleeps more must be woken more often, and the waker pays).\n"
    )
    md.append("| proxy | load | req/s | CPU-s per 1k req | user µs/req | sys µs/req | upstream sleeps/req | CPU vs nginx (same load, per rep) |")
    md.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for scenario, load in (("S1", "saturated (64 conns)"), ("L-S1", "paced, equal offered rate")):
        ng = {r["rep"]: r for r in runs(scenario, "nginx")}
        for target in ("nginx", "idemgate-mem"):
            rs = runs(scenario, target)
            if not rs:
                continue
            ratios = [
                r["cpu_s_per_1k"] / ng[r["rep"]]["cpu_s_per_1k"]
                for r in rs
                if r["rep"] in ng and ng[r["rep"]]["cpu_s_per_1k"] and r["cpu_s_per_1k"]
            ]
            entry = {
                "scenario": scenario,
                "target": target,
                "rps_median": med([r["rps"] for r in rs]),
                "cpu_s_per_1k_median": med([r["cpu_s_per_1k"] for r in rs]),
                "user_us_per_req_median": med([r.get("user_us_per_req") for r in rs]),
                "sys_us_per_req_median": med([r.get("sys_us_per_req") for r in rs]),
                "upstream_sleeps_per_req_median": med([r.get("aux_sleeps_per_req") for r in rs]),
                "cpu_ratio_vs_nginx_median": med(ratios),
                "cpu_ratio_vs_nginx_reps": [round(x, 3) for x in ratios],
            }
            summary.setdefault("s1_cpu", []).append(entry)
            md.append(
                f"| {target} | {load} | {fmt(entry['rps_median'])} | {fmt(entry['cpu_s_per_1k_median'], 4)} | "
                f"{fmt(entry['user_us_per_req_median'], 1)} | {fmt(entry['sys_us_per_req_median'], 1)} | "
                f"{fmt(entry['upstream_sleeps_per_req_median'], 2)} | "
                f"{fmt(entry['cpu_ratio_vs_nginx_median'], 2, '×')} "
                f"({', '.join(fmt(x, 2) for x in entry['cpu_ratio_vs_nginx_reps'])}) |"
            )
    md.append("")

    # ---- latency at half load
    lat_targets = [
        ("S1", "nginx", "GET via nginx"),
        ("S1", "idemgate-mem", "GET via idemgate"),
        ("S2", "idemgate-mem", "POST new key, idemgate memory"),
        ("S2", "idemgate-redis", "POST new key, idemgate Redis"),
    ]
    md.append("## Latency added over direct at half of the peak rate\n")
    md.append(
        f"Method: wrk cannot hold a fixed rate (no wrk2), so the wrk script paces itself: "
        f"every connection waits a random 0–{2 * float(meta['pace_ms']):g} ms (mean "
        f"{meta['pace_ms']} ms) before each request, and the number of connections is "
        f"chosen as half the scenario's median peak rate × the mean pause, so that the "
        f"offered rate is about half of the peak whatever the latency (S1: nginx and idemgate "
        f"both get half of the lower of their two peaks, so they compare at equal load). The same paced load "
        f"is sent straight to the upstream right before each proxied run; the added "
        f"latency is proxied − direct per repetition, median of the repetitions. wrk times a "
        f"request from its write to the end of its response.\n"
    )
    md.append(
        "| path | offered conns | achieved req/s (of peak) | direct p50 / p99 (ms) | proxied p50 / p99 (ms) | "
        "added p50 (ms) | added p99 (ms) | added p99 per rep (ms) |"
    )
    md.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for scenario, target, label in lat_targets:
        prox = runs(f"L-{scenario}", target)
        direct = {r["rep"]: r for r in runs(f"L-{scenario}", f"direct-for-{target}")}
        if not prox:
            continue
        peak = med([r["rps"] for r in runs(scenario, target)])
        d50, d99, a50, a99 = [], [], [], []
        for r in prox:
            d = direct.get(r["rep"])
            if not d:
                continue
            d50.append(d["latency_us"]["p50"] / 1000)
            d99.append(d["latency_us"]["p99"] / 1000)
            a50.append((r["latency_us"]["p50"] - d["latency_us"]["p50"]) / 1000)
            a99.append((r["latency_us"]["p99"] - d["latency_us"]["p99"]) / 1000)
        achieved = med([r["rps"] for r in prox])
        entry = {
            "scenario": scenario,
            "target": target,
            "label": label,
            "connections": prox[0]["connections"],
            "pace_ms": prox[0]["pace_ms"],
            "achieved_rps_median": achieved,
            "peak_rps_median": peak,
            "direct_p50_ms": med(d50),
            "direct_p99_ms": med(d99),
            "proxied_p50_ms": med([r["latency_us"]["p50"] / 1000 for r in prox]),
            "proxied_p99_ms": med([r["latency_us"]["p99"] / 1000 for r in prox]),
            "added_p50_ms": med(a50),
            "added_p99_ms": med(a99),
            "added_p99_ms_reps": [round(x, 3) for x in a99],
            "errors": sum(r["error_count"] for r in prox),
        }
        summary["latency"].append(entry)
        md.append(
            f"| {label} | {entry['connections']} | {fmt(achieved)} ({fmt(achieved / peak * 100 if peak else None, 0, '%')}) | "
            f"{fmt(entry['direct_p50_ms'], 3)} / {fmt(entry['direct_p99_ms'], 3)} | "
            f"{fmt(entry['proxied_p50_ms'], 3)} / {fmt(entry['proxied_p99_ms'], 3)} | "
            f"{fmt(entry['added_p50_ms'], 3)} | {fmt(entry['added_p99_ms'], 3)} | "
            + ", ".join(fmt(x, 3) for x in entry["added_p99_ms_reps"])
            + " |"
        )
    md.append("")

    # ---- S4
    s4 = [r for r in rows if r["scenario"] == "S4"]
    if s4:
        md.append("## S4: 64 concurrent duplicates of one key, 200 ms upstream\n")
        md.append(
            "All clients connect first, then send at once (a barrier). `executions` is the "
            "upstream's own request count for the run.\n"
        )
        md.append("| store | concurrent | rep | executions | answered | answers |")
        md.append("|---|---|---:|---:|---:|---|")
        for r in sorted(s4, key=lambda r: (r["target"], r["mode"], r["rep"])):
            answers = ", ".join(f"{n}× {k}" for k, n in r["answers"].items())
            if r["errors"]:
                answers += f"; no answer: {r['errors']}"
            md.append(
                f"| {r['target']} | {r['mode']} | {r['rep']} | {r['executions']} | "
                f"{r['answered']}/{r['clients']} | {answers} (times {r['ms_min']}–{r['ms_max']} ms) |"
            )
            summary["s4"].append(r)
        md.append("")

    # ---- memory
    mems = [r for r in rows if r["scenario"] == "MEM"]

    def mem(target, when):
        return [r for r in mems if r["target"] == target and r["when"] == when]

    memory = {}
    idle = mem("idemgate-mem", "idle")
    after = mem("idemgate-mem", "after-S2")
    if after:
        s2 = {r["rep"]: r["requests"] for r in runs("S2", "idemgate-mem")}
        per_record = [
            (r["rss_kb"] - idle[0]["rss_kb"]) * 1024 / (s2.get(r["rep"], 0) + 16)
            for r in after
            if idle and s2.get(r["rep"])
        ]
        memory["idemgate-mem"] = {
            "idle_kb": idle[0]["rss_kb"] if idle else None,
            "after_s2_kb_median": med([r["rss_kb"] for r in after]),
            "after_s2_kb_reps": [r["rss_kb"] for r in after],
            "records_median": med([s2.get(r["rep"], 0) + 16 for r in after]),
            "bytes_per_record_median": med(per_record),
        }
    r_idle = mem("idemgate-redis", "idle")
    r_after = mem("idemgate-redis", "after-S2")
    r_end = mem("idemgate-redis", "end")
    if r_idle or r_after:
        memory["idemgate-redis"] = {
            "idle_kb": r_idle[0]["rss_kb"] if r_idle else None,
            "after_s2_kb_max": max((r["rss_kb"] for r in r_after), default=None),
            "after_s2_kb_reps": [r["rss_kb"] for r in r_after],
            "hwm_kb_end": r_end[0]["hwm_kb"] if r_end else None,
        }
    n_idle, n_end = mem("nginx", "idle"), mem("nginx", "end")
    if n_idle:
        memory["nginx"] = {"idle_kb": n_idle[0]["rss_kb"], "hwm_kb_end": n_end[0]["hwm_kb"] if n_end else None}
    rs = mem("redis-server", "after-S2")
    if rs:
        memory["redis-server"] = {
            "after_s2_kb_median": med([r["rss_kb"] for r in rs]),
            "keys_median": med([r["keys"] for r in rs]),
            "used_memory_per_key_median": med([r["used_memory"] / r["keys"] for r in rs if r["keys"]]),
        }
    summary["memory"] = memory
    if memory:
        mb = lambda kb: fmt(kb / 1024 if kb is not None else None, 1, " MB")
        md.append("## Memory (VmRSS from /proc/PID/status)\n")
        md.append(
            "Every repetition starts from empty stores: the memory-store idemgate is restarted "
            "and Redis is flushed, so \"after S2\" is one S2 run's worth of records (the memory "
            "store keeps each for its 1 h ttl). The Redis-store idemgate runs throughout.\n"
        )
        md.append("| process | idle (after start) | after S2 (per rep) | records then | bytes per record | peak (VmHWM at the end) |")
        md.append("|---|---:|---:|---:|---:|---:|")
        m = memory.get("idemgate-mem")
        if m:
            md.append(
                f"| idemgate, memory store | {mb(m['idle_kb'])} | {mb(m['after_s2_kb_median'])} "
                f"({', '.join(mb(x) for x in m['after_s2_kb_reps'])}) | {fmt(m['records_median'])} | "
                f"{fmt(m['bytes_per_record_median'])} (RSS growth / records) | – |"
            )
        m = memory.get("idemgate-redis")
        if m:
            md.append(
                f"| idemgate, Redis store | {mb(m['idle_kb'])} | {mb(m['after_s2_kb_max'])} (max of "
                f"{', '.join(mb(x) for x in m['after_s2_kb_reps'])}) | in Redis | – | {mb(m['hwm_kb_end'])} |"
            )
        m = memory.get("nginx")
        if m:
            md.append(f"| nginx (master + worker) | {mb(m['idle_kb'])} | – | – | – | {mb(m['hwm_kb_end'])} |")
        m = memory.get("redis-server")
        if m:
            md.append(
                f"| redis-server | – | {mb(m['after_s2_kb_median'])} | {fmt(m['keys_median'])} keys | "
                f"{fmt(m['used_memory_per_key_median'])} (used_memory / keys) | – |"
            )
        md.append("")

    # ---- targets
    def tp(scenario, target):
        return next(
            (e for e in summary["throughput"] if e["scenario"] == scenario and e["target"] == target),
            None,
        )

    def lat(scenario, target):
        return next(
            (e for e in summary["latency"] if e["scenario"] == scenario and e["target"] == target),
            None,
        )

    targets = []
    s1 = tp("S1", "idemgate-mem")
    if s1:
        targets.append(("S1 req/s vs nginx", "≥ 1.0×", s1["ratio_vs_nginx_s1_median"], lambda x: x >= 1.0, "×", 2))
        cpu_ratios = [
            r["cpu_s_per_1k"] / nginx_cpu[r["rep"]]
            for r in runs("S1", "idemgate-mem")
            if nginx_cpu.get(r["rep"]) and r["cpu_s_per_1k"]
        ]
        targets.append(("S1 CPU-s per 1k requests vs nginx", "≤ 1.0×", med(cpu_ratios), lambda x: x <= 1.0, "×", 2))
        eq = next((e for e in summary.get("s1_cpu", []) if e["scenario"] == "L-S1" and e["target"] == "idemgate-mem"), None)
        if eq:
            targets.append(("… the same at equal offered load (paced runs)", "≤ 1.0×", eq["cpu_ratio_vs_nginx_median"], lambda x: x <= 1.0, "×", 2))
    for scenario, goal, bound in (("S2", "≥ 0.5×", 0.5), ("S3", "≥ 0.8×", 0.8)):
        e = tp(scenario, "idemgate-redis")
        if e:
            targets.append(
                (f"{scenario} Redis req/s vs nginx S1", goal, e["ratio_vs_nginx_s1_median"],
                 (lambda b: lambda x: x >= b)(bound), "×", 2)
            )
            if e.get("proxy_busy_median") is not None and e["proxy_busy_median"] < 0.95:
                targets.append(
                    (f"… its proxy core's capacity vs nginx S1's (the load core was the limit: "
                     f"proxy core {e['proxy_busy_median']:.0%} busy)", f"(the same bound: {goal})",
                     e.get("capacity_vs_nginx_s1_median"), None, "×", 2)
                )
    for store in ("idemgate-mem", "idemgate-redis"):
        for mode in ("wait", "reject"):
            rs = [r for r in s4 if r["target"] == store and r["mode"] == mode]
            if rs:
                ok = all(r["executions"] == 1 and r["answered"] == r["clients"] for r in rs)
                text = ", ".join(f"{r['executions']} / {r['answered']} of {r['clients']}" for r in rs)
                targets.append((f"S4 executions / answered ({store}, {mode})", "exactly 1 / 64 of 64", text, lambda x, ok=ok: ok, "", None))
    worst = None
    for scenario, target, _ in lat_targets:
        e = lat(scenario, target)
        if e and target != "nginx" and e["added_p99_ms"] is not None:
            targets.append((f"added p99 at half load ({scenario} {target})", "≤ 1 ms", e["added_p99_ms"], lambda x: x <= 1.0, " ms", 3))
            worst = e["added_p99_ms"] if worst is None else max(worst, e["added_p99_ms"])
    m = memory.get("idemgate-redis", {})
    if m.get("idle_kb") is not None:
        targets.append(("RSS idle (Redis instance)", "< 30 MB", m["idle_kb"] / 1024, lambda x: x < 30, " MB", 1))
    if m.get("after_s2_kb_max") is not None:
        targets.append(("RSS after S2 (Redis)", "< 100 MB", m["after_s2_kb_max"] / 1024, lambda x: x < 100, " MB", 1))
    m = memory.get("idemgate-mem", {})
    if m.get("after_s2_kb_median") is not None:
        targets.append(
            (f"RSS after S2, memory store ({fmt(m['records_median'])} records in the process)", "(not a target)",
             m["after_s2_kb_median"] / 1024, None, " MB", 1)
        )

    md.append("## Targets of issue 8\n")
    md.append("| figure | target | this run | met |")
    md.append("|---|---|---:|:---:|")
    for name, goal, value, check, unit, digits in targets:
        if isinstance(value, str):
            shown = value
        else:
            shown = fmt(value, digits, unit)
        met = "–" if check is None or value is None else ("yes" if check(value) else "**no**")
        md.append(f"| {name} | {goal} | {shown} | {met} |")
        summary["targets"].append({"figure": name, "target": goal, "value": value, "met": met})
    md.append("")

    # ---- noise
    md.append("## Noise\n")
    busy_other = []
    for r in rows:
        if r["scenario"] in ("S1", "S2", "S3") and r["target"] != "direct":
            core = r["cores"].get(str(meta["proxy_cpu"]))
            if core and r["proxy_busy"] is not None:
                busy_other.append(max(0.0, core["busy"] - r["proxy_busy"]))
    spreads = [e["rps_spread"] for e in summary["throughput"]]
    md.append(
        f"- Spread of req/s across repetitions: median {fmt(med(spreads) * 100 if spreads else None, 0, '%')}, "
        f"largest {fmt(max(spreads) * 100 if spreads else None, 0, '%')} (per scenario in the throughput table)."
    )
    if busy_other:
        md.append(
            f"- Proxy core time not used by the proxy under load (other processes, softirq): "
            f"median {med(busy_other):.0%}, largest {max(busy_other):.0%}."
        )
    md.append(
        "- A proxy core below ~95% busy means the load side (wrk + upstream + redis on one "
        "core) was the bottleneck, not the proxy: that run's req/s is a lower bound for the proxy."
    )
    md.append(f"- Load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end', '?')}.")
    md.append("")

    with open(o["md"], "w") as f:
        f.write("\n".join(md))
    with open(o["json"], "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": rows}, f, indent=1)
    print("\n".join(md))


def ab_summary(argv):
    """Medians per target of bench/ab's runs, and ratios to the first target per round."""
    raw, names = argv[0], argv[1:]
    with open(raw) as f:
        rows = [json.loads(line) for line in f]
    by = {(r["target"], r["rep"]): r for r in rows}
    rounds = sorted({r["rep"] for r in rows})
    base = names[0]
    print(f"\n{'target':<12} {'req/s':>9} {'cpu-s/1k':>9} {'user µs':>8} {'sys µs':>7} {'spread':>7} "
          f"{'req/s vs ' + base:>14} {'cpu vs ' + base:>12} {'p50 ms':>7} {'p99 ms':>7}")
    for name in names:
        runs = [by[(name, r)] for r in rounds if (name, r) in by]
        rps = [r["rps"] for r in runs]
        ratio_rps = [by[(name, r)]["rps"] / by[(base, r)]["rps"] for r in rounds]
        ratio_cpu = [by[(name, r)]["cpu_s_per_1k"] / by[(base, r)]["cpu_s_per_1k"] for r in rounds]
        print(f"{name:<12} {med(rps):>9.0f} {med([r['cpu_s_per_1k'] for r in runs]):>9.4f} "
              f"{med([r['user_us_per_req'] for r in runs]):>8.2f} {med([r['sys_us_per_req'] for r in runs]):>7.2f} "
              f"{spread(rps):>7.0%} {med(ratio_rps):>13.2f}x {med(ratio_cpu):>11.2f}x "
              f"{med([r['latency_us']['p50'] / 1000 for r in runs]):>7.3f} "
              f"{med([r['latency_us']['p99'] / 1000 for r in runs]):>7.3f}")


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-ports":
        print(" ".join(str(p) for p in free_ports(int(args[0]))))
    elif cmd == "wait-http":
        ok = wait_http(args[0], float(args[1]) if len(args) > 1 else 30)
        sys.exit(0 if ok else 1)
    elif cmd == "snap":
        print(json.dumps(snap(args)))
    elif cmd == "rss":
        rss, hwm = proc_status(args[0])
        print(rss, hwm)
    elif cmd == "record":
        record(args)
    elif cmd == "mem-record":
        mem_record(args)
    elif cmd == "s4-record":
        s4_record(args)
    elif cmd == "ab-summary":
        ab_summary(args)
    elif cmd == "report":
        report(args)
    else:
        raise SystemExit(f"unknown subcommand {cmd}\n{__doc__}")


if __name__ == "__main__":
    main()
